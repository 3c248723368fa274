"""How to wire grail-analysis into a training loop: three complete, offline, CPU-only examples.

    python research/trl/analysis_integration_example.py --example custom    # plain PyTorch loop
    python research/trl/analysis_integration_example.py --example trainer   # HF Trainer + callback
    python research/trl/analysis_integration_example.py --example grpo      # TRL GRPOTrainer
    python research/trl/analysis_integration_example.py --example all --smoke   # a few steps each

Everything is built in-process: a tiny random-init Qwen2, a byte-level BPE tokenizer trained on
the synthetic task, an in-memory ``datasets.Dataset``. The task is sorting digits
(``"3 9 1 7 = 1 3 7 9"``); the GRPO example rewards completions made of digits.

A table row is printed at every measurement step. Columns: the loss (GRPO: mean reward),
``|dW|`` = L2 norm of the update over the last interval, ``changed`` = fraction of weights that
moved by more than 1e-6, then the output quality of a sparse update that keeps only the largest
10% of the entries of that update: ``KL top10%`` (KL divergence from the full update's
next-token distribution, averaged over tokens), ``KL rand10%`` (the same for a random 10%) and
``top1 top10%`` (fraction of tokens whose argmax agrees). Large updates dominate when ``KL
top10%`` is far below ``KL rand10%``. ``KL to base`` is KL(P_base || P_now): how far the whole run
so far has moved the outputs from the starting model (``drift/kl_base_now``); it keeps growing
while each interval's update stays small when many small windows add up.

``--report-to wandb`` also logs to Weights & Biases (offline unless WANDB_MODE says otherwise).
Metrics of the custom loop are written to ``<output-dir>/analysis.jsonl`` as well.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager  # noqa: E402
from grail.trainer.analysis.integrations import JsonlSink  # noqa: E402

# example: (steps, interval) by default and with --smoke
DEFAULTS = {"custom": (300, 50), "trainer": (200, 40), "grpo": (60, 10)}
SMOKE = {"custom": (4, 2), "trainer": (4, 2), "grpo": (3, 1)}
KEEP = "keep_0.1"
COLUMNS = [
    ("|dW|", "param_change/norm_l2"),
    ("changed", "param_change/changed_ratio_at_1e-06"),
    ("KL top10%", f"sparse/kl_at_{KEEP}"),
    ("KL rand10%", f"sparse/kl_at_{KEEP}_random"),
    ("top1 top10%", f"sparse/top1_agree_at_{KEEP}"),
    ("KL to base", "drift/kl_base_now"),
]


# --- data, tokenizer, model ------------------------------------------------------------------
def sort_example(rng: random.Random, n: int = 6) -> str:
    digits = [rng.randrange(10) for _ in range(n)]
    return " ".join(map(str, digits)) + " = " + " ".join(map(str, sorted(digits)))


def build_tokenizer(corpus: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model(tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def analysis_config(interval: int) -> AnalysisConfig:
    # No threshold masks: a kept fraction (largest 10% of entries) is the readable question.
    # drift/*: the whole run so far against the starting weights (one extra forward; no masks).
    return AnalysisConfig(
        interval=interval,
        sparse_quality_thresholds=[],
        sparse_quality_keep_ratios=[0.1],
        drift_enabled=True,
        drift_keep_ratios=[],
    )


# --- output ----------------------------------------------------------------------------------
class Table:
    """Prints one row per measurement through tqdm, so the progress bar stays intact."""

    def __init__(self, first_column: str) -> None:
        self.names = ["step", first_column] + [name for name, _ in COLUMNS]
        self.rows = 0

    def row(self, step: int, first: float | None, metrics: dict[str, float]) -> None:
        if self.rows == 0:
            tqdm.write("  ".join(f"{n:>11}" for n in self.names))
        cells = [f"{step:>11d}", f"{first:>11.4f}" if first is not None else f"{'-':>11}"]
        for _, key in COLUMNS:
            value = metrics.get(key)
            cells.append(f"{value:>11.3g}" if value is not None else f"{'-':>11}")
        tqdm.write("  ".join(cells))
        self.rows += 1


def table_callback(table: Table, first_key: str, prefix: str = "analysis/") -> Any:
    """A Trainer callback: progress bar over steps, a table row per analysis log."""
    from transformers import TrainerCallback

    class MetricsTable(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.pending: tuple[int, dict[str, float]] | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc="steps", leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            found = {k[len(prefix) :]: v for k, v in logs.items() if k.startswith(prefix)}
            if found:
                self.flush()
                self.pending = (state.global_step, found)
            elif first_key in logs and self.pending and self.pending[0] == state.global_step:
                table.row(state.global_step, logs[first_key], self.pending[1])
                self.pending = None

        def flush(self) -> None:
            if self.pending:
                table.row(self.pending[0], None, self.pending[1])
                self.pending = None

        def on_train_end(self, args, state, control, **kwargs):
            self.flush()
            self.bar.close()

    return MetricsTable()


def attach_table(trainer: Any, table: Table, first_key: str) -> None:
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)  # our bar and table replace the dict printout
    trainer.add_callback(table_callback(table, first_key))


def train(trainer: Any, report_to: str, out: str) -> None:
    """``trainer.train()``; with wandb, one run per example, written under ``out``."""
    if report_to != "wandb":
        trainer.train()
        return
    import wandb

    # The Trainer's wandb integration logs into an active run instead of starting its own.
    wandb.init(project="grail-analysis-demo", dir=out, name=os.path.basename(out))
    try:
        trainer.train()
    finally:
        wandb.finish()


# --- examples --------------------------------------------------------------------------------
def run_custom(steps: int, interval: int, report_to: str, out: str, seed: int) -> int:
    """A plain PyTorch loop: manager.on_optimizer_step after every optimizer.step()."""
    rng = random.Random(seed)
    tokenizer = build_tokenizer([sort_example(rng) for _ in range(2000)])
    model = build_model(tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    analyzer = ModelAnalysisManager.create(analysis_config(interval))
    analyzer.set_base(model)  # drift/* from the starting weights (default: after step 1)
    # A fixed probe batch makes the numbers comparable from one measurement to the next.
    probe = tokenizer([sort_example(rng) for _ in range(16)], return_tensors="pt", padding=True)
    sinks: list[Any] = [JsonlSink(os.path.join(out, "analysis.jsonl"))]
    run = None
    if report_to == "wandb":
        import wandb

        from grail.trainer.analysis.integrations import WandbSink

        run = wandb.init(project="grail-analysis-demo", dir=out, name="custom")
        sinks.append(WandbSink(run, prefix="analysis/"))
    table = Table("loss")
    losses: list[float] = []
    for step in tqdm(range(1, steps + 1), desc="steps", leave=False):
        batch = tokenizer([sort_example(rng) for _ in range(32)], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        metrics = analyzer.on_optimizer_step(model, inputs=probe, optimizer=optimizer)
        if run is not None:
            run.log({"loss": losses[-1]}, step=step)
        if metrics:
            for sink in sinks:
                sink.log(metrics, step)
            recent = losses[-interval:]
            table.row(step, sum(recent) / len(recent), metrics)
    for sink in sinks:
        sink.close()
    if run is not None:
        run.finish()
    print(f"metrics written to {os.path.join(out, 'analysis.jsonl')}")
    return table.rows


def run_trainer(steps: int, interval: int, report_to: str, out: str, seed: int) -> int:
    """Hugging Face Trainer: the shipped callback logs through the trainer's own logging."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from grail.trainer.analysis.integrations import ModelAnalysisCallback

    rng = random.Random(seed)
    texts = [sort_example(rng) for _ in range(2000)]
    tokenizer = build_tokenizer(texts)
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"]
    )
    analyzer = ModelAnalysisManager.create(analysis_config(interval))
    # Probe strings are tokenized with the trainer's processing_class when training starts.
    callback = ModelAnalysisCallback(analyzer, probe_inputs=texts[:16])
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
        logging_steps=interval, save_strategy="no", report_to=report_to, use_cpu=True,
        seed=seed, disable_tqdm=False, dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=build_model(tokenizer, seed), args=args, train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer, callbacks=[callback],
    )
    table = Table("loss")
    attach_table(trainer, table, "loss")
    train(trainer, report_to, out)
    return table.rows


def run_grpo(steps: int, interval: int, report_to: str, out: str, seed: int) -> int:
    """TRL GRPOTrainer: the callback captures the training batch (prompt + completion)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grail.trainer.analysis.integrations import ModelAnalysisCallback

    rng = random.Random(seed)
    texts = [sort_example(rng) for _ in range(2000)]
    tokenizer = build_tokenizer(texts)
    prompts = [t.split("=")[0] + "=" for t in texts[:256]]

    def digit_reward(completions: list[str], **kwargs: Any) -> list[float]:
        """Fraction of non-space characters that are digits."""
        out = []
        for c in completions:
            chars = [ch for ch in c if not ch.isspace()]
            out.append(sum(ch.isdigit() for ch in chars) / len(chars) if chars else 0.0)
        return out

    analyzer = ModelAnalysisManager.create(analysis_config(interval))
    args = GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=12, learning_rate=1e-2, beta=0.0, use_cpu=True, bf16=False,
        gradient_checkpointing=False, logging_steps=interval, save_strategy="no",
        report_to=report_to, seed=seed, disable_tqdm=False,
    )
    trainer = GRPOTrainer(
        model=build_model(tokenizer, seed), reward_funcs=digit_reward, args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
        callbacks=[ModelAnalysisCallback(analyzer)],
    )
    table = Table("reward")
    attach_table(trainer, table, "reward")
    train(trainer, report_to, out)
    return table.rows


EXAMPLES = {"custom": run_custom, "trainer": run_trainer, "grpo": run_grpo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--example", choices=[*EXAMPLES, "all"], default="custom")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (per example)")
    parser.add_argument("--interval", type=int, default=None, help="steps between measurements")
    parser.add_argument("--report-to", choices=["none", "wandb"], default="none")
    parser.add_argument("--smoke", action="store_true", help="a few steps each (for CI)")
    parser.add_argument("--output-dir", default=None, help="default: a new temporary directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (tiny models gain nothing from more)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)

    if opts.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # set WANDB_MODE=online to upload
        os.environ.setdefault("WANDB_SILENT", "true")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    out_root = opts.output_dir or tempfile.mkdtemp(prefix="grail-analysis-example-")
    names = list(EXAMPLES) if opts.example == "all" else [opts.example]
    for name in names:
        steps, interval = (SMOKE if opts.smoke else DEFAULTS)[name]
        steps = opts.steps or steps
        interval = opts.interval or interval
        out = os.path.join(out_root, name)
        os.makedirs(out, exist_ok=True)
        print(f"\n== {name}: {steps} steps, analysis every {interval} ==", flush=True)
        start = time.perf_counter()
        rows = EXAMPLES[name](steps, interval, opts.report_to, out, opts.seed)
        print(f"== {name}: {rows} measurements in {time.perf_counter() - start:.1f}s ==")
        if rows == 0 and steps >= 2 * interval:
            print(f"error: the {name} example produced no measurements", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
