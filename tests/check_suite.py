"""Check the test suite itself: break one feature at a time in a copy of the repository and see whether the tests fail.

    python3 tests/check_suite.py                      # every breakage on its own test selection, pytest -x
    python3 tests/check_suite.py --whole              # every breakage against the whole suite, pytest -x
    python3 tests/check_suite.py --only freeze-lora-ignored --only prompt-labelled
    python3 tests/check_suite.py --list               # the breakages and their selections, nothing run
    python3 tests/check_suite.py --only tool-inside-call -k "inside_a_call"   # narrow further with pytest -k

The repository's files (`git ls-files`: tracked, plus untracked files that are not ignored) are copied to a temporary
directory. A breakage is a list of text replacements in the source; each pattern must occur exactly once, so a
breakage that no longer applies after the code changed is reported as STALE, never silently skipped. First the union
of the selections runs on the unbroken copy and must pass; then each breakage is applied alone, its selection runs
(`python -m pytest -x -q`), and the copy is restored. The table says, per breakage, CAUGHT (a test failed), NOT CAUGHT
(every test passed), STALE or ERROR (pytest could not run the tests), with the seconds it took and the first failing
test. Exit status 0 when every breakage is caught. CPU heavy: run it alone, with OMP_NUM_THREADS=1 on a shared box.

Not a test module: pytest collects only tests/test_*.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 1800
logger = logging.getLogger("check_suite")


@dataclass(frozen=True)
class Edit:
    """Replace `old` (which must occur exactly once) by `new` in the file `path` (relative to the repository)."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Breakage:
    name: str
    what: str
    edits: tuple[Edit, ...]
    selection: tuple[str, ...]


RESUME = ("tests/test_resume.py",)
MODEL = ("tests/test_model.py",)
DISTRIBUTED = ("tests/test_distributed.py",)
PROTOTYPES = ("tests/test_prototypes.py",)

BREAKAGES = (
    Breakage("resume-from-round-1", "--resume retrains every round from round 1",
             (Edit("sequential.py", "        if index < run.completed_rounds:\n            continue",
                   "        if index < 0:\n            continue"),),
             RESUME),
    Breakage("resume-without-checkpoint", "--resume trains the missing rounds without loading the last checkpoint",
             (Edit("sequential.py", "    model.load(checkpoint)\n", "    pass\n"),),
             RESUME),
    Breakage("inactive-rows-updated", "every row is active in every round (active_tool_mask all True)",
             (Edit("sequential.py", "    mask = torch.zeros(model.num_tools, dtype=torch.bool)",
                   "    mask = torch.ones(model.num_tools, dtype=torch.bool)"),),
             RESUME + MODEL),
    Breakage("inactive-rows-stepped", "inactive rows keep their gradient and are not restored after the step",
             (Edit("training.py", "rows.grad[~active_tools] = 0", "rows.grad[~active_tools] *= 1"),
              Edit("training.py", "                _restore_inactive_rows(model, active_tools, snapshots)\n",
                   "                pass\n")),
             MODEL + RESUME),
    Breakage("freeze-lora-ignored", "--freeze_lora_after_first is ignored: LoRA trains in every round",
             (Edit("main_sequential.py",
                   "return self.use_lora and not (self.freeze_lora_after_first and round_index > 0)",
                   "return self.use_lora"),),
             RESUME),
    Breakage("prompt-labelled", "the prompt tokens are labelled too (loss on the whole sequence)",
             (Edit("dataset.py", "labels=[IGNORE_INDEX] * len(prompt) + answer,",
                   "labels=prompt + answer,"),),
             ("tests/test_dataset.py",) + MODEL),
    Breakage("truncation-ignores-the-answer", "a long training item's prompt is fitted to max_length alone, so the "
             "item (prompt + answer) passes max_length",
             (Edit("dataset.py", 'fitted = fit_prompt_ids(build, sample["user_input"], max_length - len(answer))',
                   'fitted = fit_prompt_ids(build, sample["user_input"], max_length)'),),
             ("tests/test_dataset.py",)),
    Breakage("collate-pads-right", "collate pads on the right in the attention mask",
             (Edit("dataset.py", "attention_mask[row, width - n:] = 1", "attention_mask[row, :n] = 1"),),
             ("tests/test_dataset.py",)),
    Breakage("shuffle-unseeded", "the training loader shuffles without its seeded generator",
             (Edit("dataset.py", "generator=generator if shuffle else None,", "generator=None,"),),
             ("tests/test_dataset.py",)),
    Breakage("curriculum-unsorted", "--curriculum_learning shuffles but does not put fewer calls first",
             (Edit("dataset.py", 'return sorted(shuffled, key=lambda s: len(s["tools"]))', "return shuffled"),),
             ("tests/test_dataset.py",)),
    Breakage("gold-tools-not-forced", "ground-truth-tool mode lets the model pick its own tools",
             (Edit("decoding.py", "return torch.where(at_tool.unsqueeze(1), forced_scores, scores)", "return scores"),),
             MODEL),
    Breakage("gold-tools-forced-first-only", "only the first gold tool is forced, later tool positions are not",
             (Edit("decoding.py", "at_tool = emits_tool | (choice == self.end_id)", "at_tool = torch.zeros_like(emits_tool)"),),
             MODEL),
    Breakage("gold-tool-forced-inside-call", "ground-truth forcing ignores the call boundary (the bug of issue 17)",
             (Edit("decoding.py", "at_tool &= torch.tensor(self.tracker.allowed(), device=scores.device)",
                   "at_tool = at_tool"),),
             MODEL),
    Breakage("tool-inside-call", "a tool token may come inside an unfinished call (call-boundary rule off)",
             (Edit("decoding.py", "inside_call = ~torch.tensor(self.allowed(), device=scores.device)",
                   "inside_call = torch.zeros(len(self.allowed()), dtype=torch.bool, device=scores.device)"),),
             MODEL),
    Breakage("renorm-target-active-rows", "the renormalisation target is the active rows' own mean norm",
             (Edit("training.py", "target = tensor[~active].norm(dim=-1).mean()",
                   "target = tensor[active].norm(dim=-1).mean()"),),
             MODEL + RESUME),
    Breakage("renorm-target-all-rows", "the renormalisation target is the mean norm of all rows",
             (Edit("training.py", "target = tensor[~active].norm(dim=-1).mean()", "target = tensor.norm(dim=-1).mean()"),),
             MODEL + RESUME),
    Breakage("renorm-flag-ignored", "--renorm_active_tools does not reach training",
             (Edit("main_sequential.py", "renorm_active_tools=args.renorm_active_tools,",
                   "renorm_active_tools=False,"),),
             RESUME),
    Breakage("renorm-from-round-ignored", "--renorm_from_round is ignored: every round renormalises",
             (Edit("training.py", "renorm = self.renorm_active_tools and index + 1 >= self.renorm_from_round",
                   "renorm = self.renorm_active_tools"),),
             RESUME),
    Breakage("prototype-loss-not-added", "--prototype_weight records prototypes but never adds their loss",
             (Edit("training.py", "                loss = loss + settings.prototype_weight * prototype_loss / distributed.world_size()",
                   "                loss = loss + 0.0 * prototype_loss"),),
             PROTOTYPES + RESUME),
    Breakage("prototypes-not-saved", "a checkpoint leaves the prototypes out, so a resumed run trains without them",
             (Edit("tool_memory.py", "        if self.has_prototype().any():\n            state.update(",
                   "        if False:\n            state.update("),),
             PROTOTYPES + RESUME),
    Breakage("prototypes-over-all-tools", "the prototype loss's softmax also holds tools not learned yet",
             (Edit("tool_memory.py", "        logits = self.tool_logits(draws).masked_fill(~learned.to(tools.device), float(\"-inf\"))",
                   "        logits = self.tool_logits(draws)"),),
             PROTOTYPES),
    Breakage("prototypes-of-every-tool", "a round records prototypes of every tool in its batches, not only its own",
             (Edit("tool_memory.py", "        tools = tools.to(counts.device) & (counts > 0)",
                   "        tools = counts > 0"),),
             PROTOTYPES + RESUME),
    Breakage("scores-as-sets", "tool and call scores compare sets instead of multisets",
             (Edit("eval.py", "    output_counts = Counter(outputs)\n    target_counts = Counter(targets)",
                   "    output_counts = Counter(set(outputs))\n    target_counts = Counter(set(targets))"),
              Edit("eval.py", '"exact": float(Counter(predicted_keys) == Counter(gold_keys)),',
                   '"exact": float(set(predicted_keys) == set(gold_keys)),'),
              Edit("eval.py", '"tool_exact": float(Counter(predicted_tools) == Counter(gold_tools)),',
                   '"tool_exact": float(set(predicted_tools) == set(gold_tools)),')),
             ("tests/test_eval.py",)),
    Breakage("paper-scores-as-multisets", "the paper_ scores count duplicates (multisets) instead of sets",
             (Edit("eval.py", "    output_set, target_set = set(outputs), set(targets)\n"
                   "    return _prf(len(output_set & target_set), len(output_set), len(target_set))",
                   "    return calculate_f1_score(outputs, targets)"),),
             ("tests/test_eval.py",)),
    Breakage("replay-share-ignored", "the LoRA baseline's batches hold no replayed samples",
             (Edit("lora_sequential.py",
                   "return mixed_dataloader(train_set, replay_set, batch_size, self.replay_per_batch, pad_id,",
                   "return mixed_dataloader(train_set, replay_set, batch_size, 0, pad_id,"),),
             ("tests/test_replay_buffer.py", "tests/test_reliability.py::test_every_replay_batch_holds_the_asked_share"
              "_of_earlier_rounds")),
    Breakage("retrieval-worst-first", "retrieval returns the least similar tools first",
             (Edit("tool_retrieval.py", "scores.topk(min(k, len(self.tool_names)), dim=1)",
                   "scores.topk(min(k, len(self.tool_names)), dim=1, largest=False)"),),
             ("tests/test_tool_retrieval.py",)),
    Breakage("recut-test-queries-trained", "the re-cut trains on the test side's source queries too",
             (Edit("xlam_datasets.py", "    return kept[n_test:], kept[:n_test], len(queries) - len(usable)",
                   "    return kept, kept[:n_test], len(queries) - len(usable)"),),
             ("tests/test_xlam_datasets.py",)),
    Breakage("gradients-not-summed", "several processes step on their own slice's gradient (no all-reduce)",
             (Edit("training.py", "                distributed.all_reduce_([p.grad for p in trainable if p.grad is not None])",
                   "                pass"),),
             DISTRIBUTED),
    Breakage("local-loss-normalisation", "each process divides its slice's loss by its own token count",
             (Edit("training.py", "    return out.loss * (count / total_count if total_count else 0.0), loss_value, tool_value",
                   "    return out.loss / distributed.world_size(), loss_value, tool_value"),),
             DISTRIBUTED),
    Breakage("prototypes-leave-root-gathered", "recording prototypes does not reshard the backbone before process 0 "
             "alone saves the checkpoint",
             (Edit("training.py", "    distributed.reshard(model)\n", ""),),
             DISTRIBUTED),
    Breakage("gather-out-of-order", "gathered predictions come back process by process, not in dataset order",
             (Edit("distributed.py", "            ordered[source + position * world] = item",
                   "            ordered[sum(map(len, parts[:source])) + position] = item"),),
             DISTRIBUTED),
    Breakage("unlearned-tools-offered", "decoding after a round may emit later rounds' untrained rows "
             "(blocked_tool_token_ids blocks nothing)",
             (Edit("model.py", "        if self.generation_tools is None:\n            return self.tool_token_ids[:0]",
                   "        if True:\n            return self.tool_token_ids[:0]"),),
             ("tests/test_main_sequential.py",)),
    Breakage("run-directory-unlocked", "two runs may write one run directory at once (no lock taken)",
             (Edit("experiment.py", "        if self._fd is not None or not is_main_process():",
                   "        if True:"),),
             ("tests/test_reliability.py::test_two_runs_started_a_second_apart_into_one_directory_one_runs_one_is_"
              "refused",)),
    Breakage("resume-data-unchecked", "--resume goes on with data files changed since the run started",
             (Edit("experiment.py", "        if changes:\n            more =",
                   "        if False:\n            more ="),),
             ("tests/test_reliability.py::test_main_sequential_bad_input[resume-train-file-changed]",)),
)


@dataclass
class Outcome:
    breakage: str
    result: str
    seconds: float
    detail: str = ""


def repository_files(root: Path) -> list[str]:
    """Tracked files and untracked files that git does not ignore, as repository-relative paths."""
    listing = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True)
    return sorted({name for name in listing.stdout.decode().split("\0") if name and (root / name).is_file()})


def copy_repository(root: Path, target: Path) -> None:
    for name in repository_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)


def apply(copy: Path, edits: Sequence[Edit]) -> tuple[dict[Path, str], str]:
    """Apply every edit; returns the original texts to restore and, when an edit does not apply, why."""
    originals: dict[Path, str] = {}
    for edit in edits:
        path = copy / edit.path
        if not path.is_file():
            return originals, f"{edit.path} does not exist"
        text = path.read_text(encoding="utf-8")
        originals.setdefault(path, text)
        count = text.count(edit.old)
        if count != 1:
            return originals, f"{edit.path}: pattern found {count} times: {edit.old.strip()[:60]!r}"
        path.write_text(text.replace(edit.old, edit.new), encoding="utf-8")
    return originals, ""


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text, encoding="utf-8")


def first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return match.group(1) if match else ""


def run_pytest(copy: Path, selection: Sequence[str], keyword: str | None = None) -> tuple[int, str, float]:
    """Run pytest -x on `selection` in the copy (no bytecode written, so a restored file is never shadowed)."""
    for cache in copy.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    start = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection]
    if keyword:
        command += ["-k", keyword]
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


def check(copy: Path, breakage: Breakage, selection: Sequence[str], keyword: str | None = None) -> Outcome:
    originals, problem = apply(copy, breakage.edits)
    try:
        if problem:
            return Outcome(breakage.name, "STALE", 0.0, problem)
        code, output, seconds = run_pytest(copy, selection, keyword)
    finally:
        restore(originals)
    if code == 1:
        return Outcome(breakage.name, "CAUGHT", seconds, first_failure(output))
    if code == 0:
        return Outcome(breakage.name, "NOT CAUGHT", seconds, "every selected test passed")
    return Outcome(breakage.name, "ERROR", seconds, f"pytest exit status {code}: {output.strip()[-200:]}")


def format_table(outcomes: Sequence[Outcome]) -> str:
    width = max(len(o.breakage) for o in outcomes)
    lines = [f"{'breakage':<{width}}  {'result':<10}  {'seconds':>7}  first failing test / detail"]
    for o in outcomes:
        lines.append(f"{o.breakage:<{width}}  {o.result:<10}  {o.seconds:>7.1f}  {o.detail}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whole", action="store_true", help="run the whole suite for every breakage")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this breakage")
    parser.add_argument("--list", action="store_true", help="list the breakages and exit")
    parser.add_argument("-k", "--keyword", default=None, help="pytest -k expression applied to every run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)
    known = {b.name for b in BREAKAGES}
    unknown = [name for name in args.only if name not in known]
    if unknown:
        parser.error(f"--only: unknown breakage(s) {', '.join(unknown)}; --list shows them")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    chosen = [b for b in BREAKAGES if not args.only or b.name in args.only]
    if args.list:
        for b in chosen:
            counts = [(REPO_ROOT / e.path).read_text(encoding="utf-8").count(e.old) for e in b.edits]
            state = "applies" if all(c == 1 for c in counts) else f"STALE (pattern counts {counts})"
            print(f"{b.name}: {b.what} [{state}]\n    selection: {' '.join(b.selection)}")
        return 0
    selections = {b.name: () if args.whole else b.selection for b in chosen}
    copy = Path(tempfile.mkdtemp(prefix="check_suite_"))
    try:
        copy_repository(REPO_ROOT, copy)
        union = () if args.whole else tuple(dict.fromkeys(p for b in chosen for p in b.selection))
        logger.info("unbroken copy in %s: running %s", copy, " ".join(union) or "the whole suite")
        code, output, seconds = run_pytest(copy, union, args.keyword)
        if code != 0:
            print(output[-4000:])
            print(f"the unbroken copy fails its tests (exit status {code}, {seconds:.0f} s); fix that first")
            return 2
        outcomes = [Outcome("(none: unbroken copy)", "PASSED", seconds, "the selection passes")]
        for breakage in chosen:
            logger.info("%s: %s", breakage.name, breakage.what)
            outcomes.append(check(copy, breakage, selections[breakage.name], args.keyword))
            logger.info("%s: %s (%.0f s) %s", breakage.name, outcomes[-1].result, outcomes[-1].seconds,
                        outcomes[-1].detail)
    finally:
        if args.keep:
            logger.info("kept the copy in %s", copy)
        else:
            shutil.rmtree(copy, ignore_errors=True)
    print(format_table(outcomes))
    return 0 if all(o.result == "CAUGHT" for o in outcomes[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
