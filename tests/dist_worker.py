"""A worker for tests/test_distributed.py, launched by torchrun: one scenario of distributed.py per run.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py SCENARIO OUT [ARGS...]

collectives: shard / gather_in_order / work_share / all_reduce_ / any_true / from_main against hand-made expectations;
each process writes OUT/rank<r>.json. hang: process 1 sleeps while process 0 waits in a collective (the timeout must
end it). predict MODEL_DIR TEST_FILE [shard]: training.predict of a fresh FunctionCallingModel over the test file in
batches of 3 (the backbone sharded with `shard`); process 0 writes the predictions to OUT/predictions.json.
nan: training.train_round of a toy model whose loss is NaN on process 1 alone from the second batch on; each process
writes the error it stopped with to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import distributed  # noqa: E402
from common import UserError  # noqa: E402


def collectives(out: Path) -> None:
    rank, world = distributed.rank(), distributed.world_size()
    gathered = {}
    for total in range(8):
        mine = distributed.shard(list(range(total)))
        gathered[total] = distributed.gather_in_order([f"item{i}" for i in mine], total)
    floats = torch.full((2, 3), float(rank + 1))
    doubles = torch.arange(4, dtype=torch.float64) * (rank + 1)
    distributed.all_reduce_([floats, doubles])
    try:
        distributed.from_main(lambda: (_ for _ in ()).throw(UserError("refused on process 0")))
        refused = None
    except UserError as err:
        refused = str(err)
    result = {
        "rank": rank, "world": world, "gathered": gathered,
        "floats": floats.tolist(), "doubles": doubles.tolist(),
        "any": distributed.any_true(rank == world - 1), "none": distributed.any_true(False),
        "from_main": distributed.from_main(lambda: f"made by {distributed.rank()}"),
        "refused": refused, "sums": distributed.sum_values([rank, 0.5]),
        "work_share": distributed.work_share(5),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def hang() -> None:
    if distributed.rank() == 1:
        time.sleep(120)
    distributed.sum_values([1.0])


def predict(out: Path, model_dir: str, test_file: str, shard: bool) -> None:
    from dataset import NativeFunctionCallingDataset, load_samples, make_dataloader
    from model import FunctionCallingModel
    from training import predict as run_predict

    samples = load_samples(Path(test_file))
    tools = sorted({t for s in samples for t in s["tools"]})
    model = FunctionCallingModel(model_dir, len(tools), tools, device="cpu")
    model.initialize_rows(seed=3)
    if shard:
        distributed.shard_backbone(model.causal_lm)
    data = NativeFunctionCallingDataset(samples, model.tokenizer, model.encode_tool, 256, "eval")
    predictions = run_predict(model, make_dataloader(data, 3, model.tokenizer.pad_token_id, shuffle=False),
                              max_new_tokens=10)
    if distributed.is_main():
        (out / "predictions.json").write_text(json.dumps(predictions))


class NanOnProcessOne(torch.nn.Module):
    """A toy model for train_round: loss = sum(rows) x mean(input), NaN on process 1 once an input reaches 4."""

    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.rows = torch.nn.Parameter(torch.ones(2, 3))

    def row_parameters(self) -> list[torch.nn.Parameter]:
        return [self.rows]

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def forward(self, input_ids, attention_mask, labels):
        from model import CallingOutput

        loss = self.rows.sum() * input_ids.float().mean()
        if distributed.rank() == 1 and int(input_ids.max()) >= 4:
            loss = loss * float("nan")
        return CallingOutput(logits=None, loss=loss, tool_loss=loss, num_tool_targets=torch.tensor(1))


def nan(out: Path) -> None:
    from torch.utils.data import DataLoader

    from training import TrainSettings, TrainingDiverged, train_round

    def collate(items: list[int]) -> dict:
        ids = torch.tensor([[i, i] for i in items])
        labels = torch.tensor([[-100, 1]] * len(ids))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    loader = distributed.share_batches(DataLoader(list(range(8)), batch_size=4, collate_fn=collate))
    try:
        train_round(NanOnProcessOne(), loader, TrainSettings(epochs=1, warmup_ratio=0.0))
        error = None
    except TrainingDiverged as err:
        error = str(err)
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps({"error": error}))


def main(argv: list[str] | None = None) -> int:
    scenario, out, *rest = sys.argv[1:]
    distributed.init_from_env(torch.device("cpu"))
    if scenario == "collectives":
        collectives(Path(out))
    elif scenario == "hang":
        hang()
    elif scenario == "nan":
        nan(Path(out))
    elif scenario == "predict":
        predict(Path(out), rest[0], rest[1], rest[2:] == ["shard"])
    else:
        raise UserError(f"unknown scenario {scenario!r}")
    return 0


if __name__ == "__main__":
    distributed.run_cli(main)
