"""Entry script for `ray job submit`: the same pipeline as `cwt-ray run`, on the cluster it is
submitted to (Ray sets RAY_ADDRESS for the job, so no embedded cluster is started).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run.py configs/smoke.yaml storage_path=/mnt/shared/runs
"""
import sys

from cwt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
