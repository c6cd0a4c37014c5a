"""One process of tests/tuning/test_multihost.py: jax.distributed over localhost (gloo collectives), 4 simulated CPU
devices per process, a mesh spanning both processes; process 0 writes the export."""

import os
import sys

import numpy as np


def main() -> None:
    process_id, port, model, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

    from autoround_jax.tuning.autoround import AutoRound

    ids = np.random.default_rng(0).integers(3, 300, (16, 24)).astype(np.int32)
    ar = AutoRound(model, iters=4, nsamples=16, seqlen=24, batch_size=8, dataset=ids, mesh="data=4,fsdp=2",
                   progress=False)
    ar.quantize_and_save(out)
    print(f"DONE {process_id} " + " ".join(f"{r.loss_best:.8g}" for r in ar.reports), flush=True)


if __name__ == "__main__":
    main()
