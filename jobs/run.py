"""Entry script for `ray job submit`: the same pipeline as `cwt-ray run`, on the cluster it is
submitted to (Ray sets RAY_ADDRESS for the job's driver, so no embedded cluster is started).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/run.py configs/smoke.yaml \
        storage_path=/mnt/cwt/runs ray.storage_uri=s3://YOUR-BUCKET/cwt-ray

storage_path must be a folder every node mounts at the same path; docs/cluster.md explains why
and what ray.storage_uri (checkpoints on object storage) adds.
"""
import sys

from cwt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
