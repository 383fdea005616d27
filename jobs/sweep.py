"""Entry script for `ray job submit`: the same sweep as `cwt-ray sweep`, on the cluster it is
submitted to (Ray sets RAY_ADDRESS for the job, so no embedded cluster is started). Put
storage_path on storage every node sees, so trials on other nodes share the cache and Tune's state.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/sweep.py configs/sweep_quickstart.yaml storage_path=/mnt/shared/runs
"""
import sys

from cwt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
