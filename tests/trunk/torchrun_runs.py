"""Run several `familial-train` command lines one after another inside one torchrun launch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trunk/torchrun_runs.py RUNS.json

RUNS.json is a list of {"argv": [...], "env": {...}}: each run sets its environment variables (for
that run only), calls
the real CLI (`trunk.cli.main`) in every process and must return 0; the process group the first run
starts is reused by the next. It exists only to pay for the interpreter and torch start-up once per
launch on a 2-core CI machine; it adds nothing to what the CLI does. Exit code: the first failing
run's, else 0.
"""
import json
import os
import sys


def main(path: str) -> int:
    from trunk.cli import main as cli

    for run in json.loads(open(path).read()):
        env = run.get("env", {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        rc = cli(run["argv"])
        for k, v in saved.items():  # the next run starts from the launch's environment
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
        if rc:
            print(f"run failed with exit code {rc}: {run['argv']}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
