"""One process of the asymmetric-state tests: one rank is put in an odd state, the other is not.

Run as ``python -m tests.unit.trainer.analysis.dist_asym_worker --mode ddp --odd 1 --rank 0
--world 2 --port P --out F``. Every case builds a fresh tiny model, optimizer and manager (the
same on both ranks), trains a few steps, puts rank ``--odd`` in the case's odd state at a
measurement step (no inputs, no optimizer, no gradients, an extra parameter, another step, ...)
and, after every ``on_optimizer_step`` call, issues a user collective (an all-reduce of
``rank + 1``): if the analysis left the ranks' collectives out of step, that value is wrong, the
process aborts or the group times out. The group timeout is short so that a hang fails fast.

The output JSON holds, per case, the metrics of every call, the user collective's values and the
analysis warnings; it is rewritten after every case, so a crash still shows how far it got.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.unit.trainer.analysis.ranks import leave_group, parallelize

VOCAB = 64


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--odd", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=45.0)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from torch import nn

    from grail.trainer.analysis import AnalysisConfig, MetricComputer, ModelAnalysisManager
    from grail.trainer.analysis import manager as manager_module
    from tests.conftest import tiny_qwen2

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group(
        "gloo", rank=args.rank, world_size=args.world, timeout=timedelta(seconds=args.timeout)
    )
    rank, odd = args.rank, args.rank == args.odd
    warnings = _Warnings()
    logging.getLogger("grail.trainer.analysis").addHandler(warnings)
    logging.getLogger("grail.trainer.analysis").setLevel(logging.INFO)

    class FailsOnOddRank(MetricComputer):
        def compute(self, delta, **kwargs):
            if odd:
                raise RuntimeError("only this rank fails")
            return {"fails/x": 1.0}

    class RankKeys(MetricComputer):
        name = "rank_keys"

        def compute(self, delta, **kwargs):
            return {"rank_keys/common": 1.0, f"rank_keys/only_rank{rank}": 1.0}

    def config(**overrides: Any) -> AnalysisConfig:
        base = dict(
            interval=1,
            param_change_per_layer=True,
            sparse_quality_thresholds=[1e-6],
            sparse_quality_keep_ratios=[0.5],
            sparse_quality_rescale_random=True,
            gradient_enabled=True,
            adam_sign_enabled=True,
            histogram_samples=32,
            low_rank_enabled=True,
            low_rank_ranks=[1],
            low_rank_exact_max_dim=8,
        )
        return AnalysisConfig(**{**base, **overrides})

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        model = tiny_qwen2(vocab=VOCAB, hidden=16, layers=2)  # the same weights on both ranks
        train = parallelize(model, args.mode)  # "ddp" or "fsdp"
        return model, train, torch.optim.AdamW(train.parameters(), lr=1e-2)

    def train_step(train: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        train(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        return {"input_ids": ids}

    def user_collective() -> float:
        value = torch.tensor([rank + 1.0])
        dist.all_reduce(value)
        return float(value.item())

    records: dict[str, dict] = {}
    out = Path(args.out)

    def run_case(name: str, body) -> None:
        if args.cases and name not in args.cases.split(","):
            return
        warnings.messages.clear()
        calls: list[dict[str, float]] = []
        checks: list[float] = []

        def call(manager, *a: Any, **k: Any) -> dict[str, float]:
            metrics = manager.on_optimizer_step(*a, **k)
            calls.append(metrics)
            checks.append(user_collective())
            return metrics

        body(call)
        records[name] = {"calls": calls, "checks": checks, "warnings": list(warnings.messages)}
        out.write_text(json.dumps(records))

    def standard(call, odd_kwargs: dict, cfg: AnalysisConfig | None = None,
                 odd_cfg: AnalysisConfig | None = None, extra: list | None = None,
                 before=None) -> None:
        """Snapshot at step 1; at step 2 the odd rank calls with ``odd_kwargs``; step 3 is
        normal again on both ranks."""
        model, train, opt = build()
        manager = ModelAnalysisManager.create(odd_cfg if odd and odd_cfg else cfg or config())
        for computer in extra or []:
            manager.add_metric(computer)
        for step in (1, 2, 3):
            batch = train_step(train, opt, step)
            kwargs: dict[str, Any] = {"inputs": batch, "optimizer": opt}
            if step == 2 and before is not None:
                before(model, train, opt)
            if step == 2 and odd:
                kwargs.update(odd_kwargs)
            target = kwargs.pop("model", train)
            call(manager, target, **kwargs)

    def no_grads(model, train, opt):
        if odd:
            for p in model.parameters():
                p.grad = None

    def add_parameter(model, train, opt):
        if odd:
            model.model.extra = nn.Parameter(torch.zeros(3))

    def nan_replica(model, train, opt):
        if odd:
            with torch.no_grad():
                p = next(model.parameters())
                local = p.to_local() if hasattr(p, "to_local") else p
                local.view(-1)[0] = float("nan")

    def broken_live(model, train, opt):
        if odd:
            snapshot_cls = manager_module.ParameterSnapshot
            original = snapshot_cls.__dict__["live"]

            def once(*a, **k):
                snapshot_cls.live = original
                raise RuntimeError("local failure before any collective")

            snapshot_cls.live = once

    run_case("baseline", lambda call: standard(call, {}))
    run_case("inputs_none", lambda call: standard(call, {"inputs": None}))
    run_case("inputs_unusable", lambda call: standard(call, {"inputs": "not a batch"}))
    run_case("optimizer_none", lambda call: standard(call, {"optimizer": None}))

    def sgd_case(call):
        _, train, opt = build()
        sgd = torch.optim.SGD(train.parameters(), lr=0.0)
        manager = ModelAnalysisManager.create(config())
        for step in (1, 2, 3):
            batch = train_step(train, opt, step)
            call(manager, train, inputs=batch, optimizer=sgd if odd and step == 2 else opt)

    run_case("optimizer_without_adam_state", sgd_case)
    run_case("model_none", lambda call: standard(call, {"model": None}))
    run_case("grads_none", lambda call: standard(call, {}, before=no_grads))
    run_case("grads_none_no_forward_metrics", lambda call: standard(
        call, {}, cfg=config(sparse_quality_enabled=False, low_rank_enabled=False),
        before=no_grads))
    run_case("manager_fails_locally", lambda call: standard(call, {}, before=broken_live))
    run_case("computer_fails_on_one_rank", lambda call: standard(
        call, {}, extra=[FailsOnOddRank()]))
    run_case("rank_dependent_keys", lambda call: standard(call, {}, extra=[RankKeys()]))
    run_case("config_differs", lambda call: standard(
        call, {}, odd_cfg=config(histogram_samples=16)))
    run_case("computer_on_one_rank", lambda call: standard(
        call, {}, extra=[RankKeys()] if odd else []))
    run_case("replica_nan", lambda call: standard(call, {}, before=nan_replica))

    def snapshot_case(call):
        _, train, opt = build()
        manager = ModelAnalysisManager.create(config())
        for step in (1, 2, 3):
            batch = train_step(train, opt, step)
            if step == 2 and odd:  # as after a reset() or a failed refill on this rank only
                manager.old_snapshot = None
            call(manager, train, inputs=batch, optimizer=opt)

    run_case("snapshot_missing", snapshot_case)

    def param_case(call):
        model, train, opt = build()
        manager = ModelAnalysisManager.create(config())
        for step in (1, 2, 3, 4):
            batch = train_step(train, opt, step)
            if step == 2:
                add_parameter(model, train, opt)
            call(manager, train, inputs=batch, optimizer=opt)

    run_case("parameter_added", param_case)

    def steps_case(odd_step: Any, even_step: int = 4):
        """Steps 1..6 with interval 2; at the fourth call the odd rank passes ``odd_step``, the
        other ``even_step``."""
        def body(call):
            _, train, opt = build()
            manager = ModelAnalysisManager.create(config(interval=2))
            for step in range(1, 7):
                batch = train_step(train, opt, step)
                given = step if step != 4 else odd_step if odd else even_step
                call(manager, train, inputs=batch, optimizer=opt, step=given)
        return body

    run_case("step_4_and_5", steps_case(5))
    run_case("step_4_and_6", steps_case(6))
    # what step_4_and_6 must give: both ranks pass the step rank 0 passed there
    rank0_step = 6 if args.odd == 0 else 4
    run_case("step_4_and_6_reference", steps_case(rank0_step, rank0_step))
    run_case("step_not_an_integer", steps_case(4.5))
    run_case("step_goes_back", steps_case(2))

    leave_group(2)


if __name__ == "__main__":
    main()
