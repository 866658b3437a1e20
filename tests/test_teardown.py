"""finish_distributed ends a gloo run without the teardown deadlock of issue 26.

Two processes (torchrun) each make ROUNDS fresh gloo process groups in a row; in each, a DDP step and an
all_gather (the collectives a Trainer runs), then the group is ended by ``hf_fdiv.finish_distributed`` and
the DDP model dropped after it (its ``Reducer`` holds the last reference to the group, as a trainer going
out of scope does). With the previous ending (``wait_for_everyone`` + ``destroy_process_group``, then the
model freed) a rank deadlocked in ``~ProcessGroupGloo`` by the third round in every run we made: the
main thread holds the GIL and waits for a gloo worker thread that waits for the GIL to drop a finished
work. The test fails by its timeout, with every rank's stack printed (tests/launch.py).
"""

from __future__ import annotations

import os
import sys

ROUNDS = 8


def _rank(store_dir: str) -> None:
    """One rank (RANK from torchrun): ROUNDS groups, each ended by finish_distributed."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import torch.distributed as dist
    from launch import arm_hang_dump
    from torch.nn.parallel import DistributedDataParallel

    from hf_fdiv import finish_distributed

    arm_hang_dump()
    torch.manual_seed(0)
    rank = int(os.environ["RANK"])
    for i in range(ROUNDS):
        store = dist.FileStore(os.path.join(store_dir, f"store-{i}"), 2)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
        model = DistributedDataParallel(torch.nn.Linear(8, 8))
        model(torch.randn(4, 8)).sum().backward()
        gathered = [torch.empty(3) for _ in range(2)]
        dist.all_gather(gathered, torch.full((3,), float(rank)))
        assert [float(t[0]) for t in gathered] == [0.0, 1.0]
        finish_distributed()
        assert not dist.is_initialized()
        del model, store  # the Reducer's reference to the group is the last one
        print(f"[rank {rank}] round {i} ended", flush=True)


def test_finish_distributed_ends_repeated_gloo_groups(tmp_path):
    from launch import free_port, launch

    run = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(),
                  os.path.abspath(__file__), tmp_path], timeout=120)
    assert run.returncode == 0, run.report()
    for rank in (0, 1):
        assert f"[rank {rank}] round {ROUNDS - 1} ended" in run.stdout


def test_the_readme_recipe_is_what_the_soak_launches():
    # README, "Ending your own script": the script's last line and its launch line; `make test-soak`
    # launches tests/dist_worker.py, whose main() ends with that line, with that config
    import ast
    import re

    from launch import ROOT

    readme = open(os.path.join(ROOT, "README.md")).read()
    recipe = re.search(r"Ending your own script.*?```py\n(.*?)```\s*```bash\n(.*?)```", readme, flags=re.S)
    script, command = recipe.group(1).strip().splitlines(), recipe.group(2)
    assert script[-1].split("#")[0].strip() == "finish_distributed(trainer)"
    worker = ast.parse(open(os.path.join(ROOT, "tests", "dist_worker.py")).read())
    main = next(f for f in worker.body if isinstance(f, ast.FunctionDef) and f.name == "main")
    assert ast.unparse(main.body[-1]) == "finish_distributed(tr)"
    config = re.search(r"--config_file examples/accelerate_configs/(\S+)", command).group(1)
    soak = open(os.path.join(ROOT, "tests", "soak.py")).read()
    assert f'accelerate_launch("{config}", WORKER' in soak


if __name__ == "__main__":
    _rank(sys.argv[1])
