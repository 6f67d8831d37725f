"""The ``ringtrain`` torch.distributed process group over real nodes (threads of this process,
real sockets on 127.0.0.1): every collective, op and dtype against the answer computed
locally, plus the errors a user can meet."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest

from ringtrain.comm.security import JobKey
from ringtrain.config import Settings
from ringtrain.errors import ConfigError
from ringtrain.node.node import Node
from ringtrain.testing import free_ports

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.torch

from ringtrain.integrations.torch import hooks  # noqa: E402 - after the skip
from ringtrain.integrations.torch.process_group import (  # noqa: E402 - after the skip
    RingChangedError,
    RingtrainProcessGroup,
)

SIZE = 3
# results, not failure detection, are tested here; three nodes share one interpreter on a busy
# machine
SETTINGS = Settings(heartbeat_timeout=30.0, progress_floor=60.0, progress_timeout=90.0)


def on_ring(fn: Callable[[RingtrainProcessGroup], Any], size: int = SIZE) -> list[Any]:
    """``fn(group)`` on ``size`` nodes (threads), results in rank order."""
    key, ports = JobKey.generate(), free_ports(size)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def member(index: int) -> None:
        try:
            with Node(addresses, listen=addresses[index], key=key, settings=SETTINGS,
                      node_id=f"node-{index:02d}") as node:
                group = RingtrainProcessGroup(node)
                try:
                    results[node.rank] = fn(group)
                finally:
                    group.shutdown()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a member did not finish in 120 s"
    if errors:
        raise errors[0]
    return [results[rank] for rank in range(size)]


def _value(rank: int, dtype: Any) -> Any:
    base = torch.arange(1, 7).reshape(2, 3) * (rank + 1) - 2 * rank
    if dtype == torch.bool:
        return base % 2 == 0
    if dtype.is_complex:
        return torch.complex(base.double(), -base.double()).to(dtype)
    return base.to(dtype)


REDUCTIONS = [
    (torch.float32, dist.ReduceOp.SUM), (torch.float64, dist.ReduceOp.AVG),
    (torch.float16, dist.ReduceOp.MAX), (torch.bfloat16, dist.ReduceOp.SUM),
    (torch.int64, dist.ReduceOp.MIN), (torch.int32, dist.ReduceOp.PRODUCT),
    (torch.uint8, dist.ReduceOp.BOR), (torch.int16, dist.ReduceOp.BXOR),
    (torch.bool, dist.ReduceOp.SUM), (torch.bool, dist.ReduceOp.MIN),
    (torch.complex64, dist.ReduceOp.SUM), (torch.float32, dist.ReduceOp.PRODUCT),
]


def _expected(dtype: Any, op: Any) -> Any:
    values = [_value(rank, dtype) for rank in range(SIZE)]
    if dtype == torch.bool:
        stacked = torch.stack(values)
        return stacked.any(0) if op == dist.ReduceOp.SUM else stacked.all(0)
    wide = torch.stack([v.to(torch.complex128 if dtype.is_complex else torch.float64)
                        if dtype.is_floating_point or dtype.is_complex else v for v in values])
    if op == dist.ReduceOp.SUM:
        result = wide.sum(0)
    elif op == dist.ReduceOp.AVG:
        result = wide.mean(0)
    elif op == dist.ReduceOp.MAX:
        result = wide.max(0).values
    elif op == dist.ReduceOp.MIN:
        result = wide.min(0).values
    elif op == dist.ReduceOp.PRODUCT:
        result = wide.prod(0)
    else:
        combine = {dist.ReduceOp.BOR: torch.bitwise_or, dist.ReduceOp.BXOR: torch.bitwise_xor}[op]
        result = values[0]
        for value in values[1:]:
            result = combine(result, value)
    return result.to(dtype)


def test_all_reduce_every_op_and_dtype_in_place():
    def work(group):
        tensors = [_value(group.rank(), dtype) for dtype, _ in REDUCTIONS]
        options = []
        for _, op in REDUCTIONS:
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            options.append(opts)
        works = [group.allreduce([t], o) for t, o in zip(tensors, options, strict=True)]
        for work in works:
            work.wait()
        return tensors

    members = on_ring(work)
    for results in zip(*members, strict=True):
        for result in results[1:]:
            assert torch.equal(result, results[0])  # the same bits on every member
    for (dtype, op), result in zip(REDUCTIONS, members[0], strict=True):
        expected = _expected(dtype, op)
        assert result.dtype == dtype
        tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
        assert torch.allclose(result.to(torch.complex128 if dtype.is_complex else
                                        torch.float64),
                              expected.to(torch.complex128 if dtype.is_complex else
                                          torch.float64), atol=tolerance), (dtype, op)


def test_broadcast_gathers_scatters_and_barrier():
    def work(group):
        rank, size = group.rank(), group.size()
        out = {}
        t = torch.full((4,), float(rank)) if rank else torch.arange(4.0)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        group.broadcast([t], opts).wait()
        out["broadcast"] = t
        gathered = [torch.empty(2, dtype=torch.bfloat16) for _ in range(size)]
        group.allgather([gathered], [torch.full((2,), rank + 0.5, dtype=torch.bfloat16)]).wait()
        out["all_gather"] = torch.stack(gathered)
        into = torch.empty(size * 3, dtype=torch.int64)
        group.all_gather_single(into, torch.full((3,), rank, dtype=torch.int64)).wait()
        out["all_gather_into_tensor"] = into
        mine = torch.empty(2)
        group.reduce_scatter_single(mine, torch.arange(2.0 * size) * (rank + 1)).wait()
        out["reduce_scatter_tensor"] = mine
        listed = torch.empty(2)
        group.reduce_scatter([listed], [[torch.full((2,), float(r + rank)) for r in range(size)]]
                             ).wait()
        out["reduce_scatter"] = listed
        received = [torch.empty(1) for _ in range(size)]
        group.alltoall(received, [torch.tensor([10.0 * rank + r]) for r in range(size)]).wait()
        out["all_to_all"] = torch.cat(received)
        group.barrier().wait()
        return out

    results = on_ring(work)
    total = sum(range(1, SIZE + 1))
    for rank, out in enumerate(results):
        assert torch.equal(out["broadcast"], torch.arange(4.0))
        assert torch.equal(out["all_gather"], torch.stack(
            [torch.full((2,), r + 0.5, dtype=torch.bfloat16) for r in range(SIZE)]))
        assert torch.equal(out["all_gather_into_tensor"],
                           torch.arange(SIZE).repeat_interleave(3))
        assert torch.equal(out["reduce_scatter_tensor"],
                           torch.arange(2.0 * rank, 2.0 * rank + 2) * total)
        assert torch.equal(out["reduce_scatter"],
                           torch.full((2,), float(sum(rank + r for r in range(SIZE)))))
        assert torch.equal(out["all_to_all"], torch.tensor([10.0 * r + rank for r in range(SIZE)]))


def test_errors_name_what_was_wrong():
    def work(group):
        with pytest.raises(ConfigError, match="CPU tensors only, got one on meta"):
            group.allreduce([torch.empty(2, device="meta")])
        with pytest.raises(ConfigError, match="AVG needs a floating tensor"):
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.AVG
            group.allreduce([torch.ones(2, dtype=torch.int32)], opts)
        with pytest.raises(ConfigError, match="no point-to-point"):
            group.send([torch.ones(1)], 0, 0)
        group.barrier().wait()
        group.generation -= 1  # as if the ring had moved on since the group was made
        with pytest.raises(RingChangedError, match="re-initialise the process group"):
            group.allreduce([torch.ones(2)]).wait()
        return True

    assert on_ring(work, size=2) == [True, True]


def test_ddp_on_the_ring_equals_one_process_with_the_global_batch():
    """DDP over the group (async bucket all-reduces during backward) matches the full batch;
    with the int8 communication hook, members agree exactly and stay close to it."""
    torch.manual_seed(0)  # here, not in the threads: they would share one generator
    initial = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 3)).double()

    def model():
        return copy.deepcopy(initial)

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(SIZE * 4 * 5, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (SIZE * 4 * 5,), generator=generator)

    def train(group, hook):
        net = model() if not hook else model().float()
        ddp = torch.nn.parallel.DistributedDataParallel(net, process_group=group,
                                                        bucket_cap_mb=0.0005)
        if hook:
            ddp.register_comm_hook(hooks.RingCodecState("int8", group), hooks.ring_codec_hook)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        rank = group.rank()
        for step in range(5):
            start = step * SIZE * 4 + rank * 4
            optimizer.zero_grad()
            batch = x[start:start + 4] if not hook else x[start:start + 4].float()
            torch.nn.functional.cross_entropy(ddp(batch), y[start:start + 4]).backward()
            optimizer.step()
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    members = on_ring(lambda group: (train(group, False), train(group, True)))
    results = [exact for exact, _ in members]
    compressed = [int8 for _, int8 in members]
    expected = _full_batch_sgd(model(), x, y, steps=5, momentum=0.9)
    for result in results:
        assert torch.equal(result, results[0])
        assert torch.allclose(result, expected, atol=1e-12)
    # the int8 hook: every member decodes the same bytes; error feedback keeps it close
    for result in compressed:
        assert torch.equal(result, compressed[0])
    assert (compressed[0].double() - expected).abs().max() < 2e-2


def _full_batch_sgd(net, x, y, steps, momentum):
    """The parameters ``net`` ends with after ``steps`` SGD steps (lr 0.1) on the global
    batches of SIZE x 4 samples, in one process: what the ring's members must reach."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=momentum)
    for step in range(steps):
        optimizer.zero_grad()
        batch = slice(step * SIZE * 4, (step + 1) * SIZE * 4)
        torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


# --- slow links: torch DiLoCo through the group -----------------------------------------------

def _small_net(seed):
    torch.manual_seed(seed)  # in the test's thread: the members' threads share one generator
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).double()


NETS = {rank: _small_net(100 + rank) for rank in range(SIZE)}  # differ: DiLoCo takes rank 0's


def _diloco_anchors(group, outer_kwargs, inner_steps, rounds, dtype=torch.float64):
    """Train the shared small model with torch DiLoCo on this member's own batches; returns
    the anchor after every round."""
    from ringtrain.integrations.torch.diloco import DiLoCo

    net = copy.deepcopy(NETS[group.rank()]).to(dtype)
    outer = DiLoCo(net, inner_steps=inner_steps, group=group, **outer_kwargs)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = _round_data(dtype)
    anchors = [torch.cat([a.reshape(-1) for a in outer.anchor])]
    for step in range(rounds * inner_steps):
        start = (step * SIZE + group.rank()) * 4
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x[start:start + 4]), y[start:start + 4]).backward()
        optimizer.step()
        if outer.step():
            anchors.append(torch.cat([a.reshape(-1) for a in outer.anchor]))
    return anchors


def _round_data(dtype):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(SIZE * 4 * 12, 8, generator=generator, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, 3, (SIZE * 4 * 12,), generator=generator)


def test_torch_diloco_rounds_equal_the_rounds_computed_in_one_process():
    """Every member ends each round on one anchor, the one a single process computes from the
    members' inner steps (mean change, Nesterov outer step); with H = 1, inner SGD and outer lr
    1 without momentum that is DDP's synchronous step."""
    nesterov = {"outer_lr": 0.7, "momentum": 0.9}
    plain = {"outer_lr": 1.0, "momentum": 0.0}
    members = on_ring(lambda group: (_diloco_anchors(group, nesterov, 3, 4),
                                     _diloco_anchors(group, plain, 1, 6)))
    for anchors in members[1:]:
        for got, first in zip(anchors[0] + anchors[1], members[0][0] + members[0][1],
                              strict=True):
            assert torch.equal(got, first)
    x, y = _round_data(torch.float64)
    for (kwargs, inner_steps, rounds), got in zip(
            ((nesterov, 3, 4), (plain, 1, 6)), members[0], strict=True):
        net = NETS[0]
        anchor = [p.detach().clone() for p in net.parameters()]
        outer = torch.optim.SGD(anchor, lr=kwargs["outer_lr"], momentum=kwargs["momentum"],
                                nesterov=kwargs["momentum"] > 0)
        step = 0
        for round_ in range(rounds):
            changes = []
            for rank in range(SIZE):
                member = copy.deepcopy(net)
                with torch.no_grad():
                    for param, value in zip(member.parameters(), anchor, strict=True):
                        param.copy_(value)
                inner = torch.optim.SGD(member.parameters(), lr=0.1)
                for k in range(inner_steps):
                    start = ((step + k) * SIZE + rank) * 4
                    inner.zero_grad()
                    torch.nn.functional.cross_entropy(member(x[start:start + 4]),
                                                      y[start:start + 4]).backward()
                    inner.step()
                changes.append([a - p.detach() for a, p in zip(anchor, member.parameters(),
                                                               strict=True)])
            step += inner_steps
            for i, value in enumerate(anchor):
                value.grad = sum(change[i] for change in changes) / SIZE
            outer.step()
            expected = torch.cat([a.detach().reshape(-1) for a in anchor])
            assert torch.allclose(got[round_ + 1], expected, atol=1e-12), round_
    # H = 1, plain outer step: the synchronous full-batch SGD step
    expected = _full_batch_sgd(copy.deepcopy(NETS[0]), x, y, steps=6, momentum=0.0)
    assert torch.allclose(members[0][1][-1], expected, atol=1e-12)


def test_torch_diloco_with_an_int4_pseudo_gradient_keeps_members_identical():
    int4 = {"outer_lr": 1.0, "momentum": 0.0, "compression": "int4"}
    plain = {"outer_lr": 1.0, "momentum": 0.0}
    members = on_ring(lambda group: (_diloco_anchors(group, int4, 3, 4, torch.float32),
                                     _diloco_anchors(group, plain, 3, 4, torch.float32)))
    for compressed, _ in members[1:]:
        for got, first in zip(compressed, members[0][0], strict=True):
            assert torch.equal(got, first)
    compressed, exact = members[0]
    moved = (exact[-1] - exact[0]).abs().max()
    assert 0 < (compressed[-1] - exact[-1]).abs().max() < 0.1 * moved


def test_torch_diloco_refuses_a_codec_without_the_ring_a_bad_round_and_an_elastic_broadcast():
    from ringtrain.integrations.torch import elastic
    from ringtrain.integrations.torch.diloco import DiLoCo

    net = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="inner_steps must be a positive integer"):
        DiLoCo(net, inner_steps=0)
    with pytest.raises(ConfigError, match="needs init_process_group\\('ringtrain'\\)"):
        DiLoCo(net, compression="int4", group=object())
    # a joiner's DiLoCo would broadcast alone while the members train
    with pytest.raises(ConfigError, match="elastic.State needs DiLoCo\\(..., broadcast=False\\)"):
        on_ring(lambda group: elastic.State(net, outer=DiLoCo(net, group=group)), size=1)
