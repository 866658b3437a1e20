"""The trainers' fused loss under the sharding engines themselves (torch FSDP1 / FSDP2 on CPU, gloo, two
processes), without accelerate: the loss and the parameters after one SGD step equal one process on the
whole batch. FSDP averages gradients over ranks, so the single process steps with lr / world size."""

import functools
import os
import sys

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2


def _loss_sum(model, unwrapped, ids, div):
    from hf_fdiv import get_divergence
    from hf_fdiv.trainers.loss_path import LossInputs, LossSettings, fdiv_token_loss, fused_head

    targets = torch.nn.functional.pad(ids, (0, 1), value=-100)[..., 1:]
    parts = fused_head(unwrapped)
    assert parts is not None
    _, loss_sum, _ = fdiv_token_loss(
        model, {"input_ids": ids, "use_cache": False}, targets, lambda t, V: LossInputs(t.reshape(-1), 1.0),
        lambda rows: rows, LossSettings(get_divergence(div)), parts, unwrapped=unwrapped,
    )
    return loss_sum


LAYOUTS = ["fsdp1_flat_params", "fsdp1_orig_params", "fsdp2_root_resharded", "fsdp2_head_unit"]
DIVERGENCES = ["alpha:1.5", "kl"]


def _one_step(rank, layout, div, ids):
    """Loss sum over both ranks and whole parameters after one SGD step of a sharded model."""
    import warnings

    from tiny import make_model, make_tokenizer
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    torch.manual_seed(0)
    model = make_model(make_tokenizer())
    layer_cls = type(model.model.layers[0])
    if layout.startswith("fsdp1"):
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_cls})
        wrapped = FSDP(model, use_orig_params=layout == "fsdp1_orig_params", auto_wrap_policy=policy,
                       device_id=torch.device("cpu"))
        unwrapped = wrapped.module
    else:
        for layer in model.model.layers:
            fully_shard(layer)
        if layout == "fsdp2_head_unit":
            fully_shard(model.lm_head)
        fully_shard(model, reshard_after_forward=True)
        wrapped = unwrapped = model
    from hf_fdiv.trainers import loss_path

    loss_path._warned.clear()  # the fallback warns once per process: once per layout here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = _loss_sum(wrapped, unwrapped, ids[rank * 2 : (rank + 1) * 2], div)
    loss.backward()
    torch.optim.SGD(wrapped.parameters(), lr=1.0).step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    if layout.startswith("fsdp1"):
        with FSDP.summon_full_params(wrapped):
            params = {k: v.detach().clone() for k, v in unwrapped.named_parameters()}
    else:
        params = {k: v.full_tensor().detach() for k, v in unwrapped.named_parameters()}
    params = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in params.items()}
    return {"loss": total, "params": params, "warnings": [str(w.message) for w in caught]}


def _worker(out):
    """One rank, started by torchrun (RANK, MASTER_ADDR / MASTER_PORT in the environment)."""
    sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]
    from launch import arm_hang_dump
    from tiny import make_tokenizer

    from hf_fdiv import finish_distributed

    arm_hang_dump()  # a hung rank prints its stacks and exits before the launcher's timeout
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ids = torch.randint(3, len(make_tokenizer()), (4, 12), generator=torch.Generator().manual_seed(1))
    results = {(layout, div): _one_step(rank, layout, div, ids) for layout in LAYOUTS for div in DIVERGENCES}
    if rank == 0:
        torch.save({"ids": ids, "results": results}, out)
    finish_distributed()  # leave together, close the group safely (issue 26)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Every layout x divergence in one 2-process run (process start-up dominates the cost)."""
    from launch import free_port, launch

    out = tmp_path_factory.mktemp("fsdp") / "rank0.pt"
    run = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", WORLD, "--master_port",
                  free_port(), os.path.abspath(__file__), out], timeout=180)
    assert run.returncode == 0, run.report()
    return torch.load(out)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_fused_loss_under_fsdp_equals_one_process(sharded_runs, layout, div):
    sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]
    from tiny import make_model, make_tokenizer

    got = sharded_runs["results"][(layout, div)]
    torch.manual_seed(0)
    ref = make_model(make_tokenizer())
    loss = _loss_sum(ref, ref, sharded_runs["ids"], div)
    loss.backward()
    torch.optim.SGD(ref.parameters(), lr=1.0 / WORLD).step()
    assert abs(float(got["loss"]) - float(loss)) <= 1e-5 * abs(float(loss))
    for name, value in ref.named_parameters():
        torch.testing.assert_close(got["params"][name], value.detach(), atol=2e-6, rtol=1e-5)
    # a head sharded as its own unit cannot be read whole: the model's own logits are used, and said so
    fell_back = any("materialised logits" in w for w in got["warnings"])
    assert fell_back == (layout == "fsdp2_head_unit")


if __name__ == "__main__":  # a rank of the 2-process run (sharded_runs)
    _worker(sys.argv[1])
