"""Fine-tuning the pretrained SO3LR against training from scratch, same data and wall-clock budget (issue 17).

    .venv/bin/python benchmarks/so3lr_finetune.py [--budget-minutes 5] [--models so3lr-finetuned,scratch]

Data: acetylacetone (`../shared/data/botnet_acac`, PBE+D3/def2-SVP): 450 training and 50 validation
structures of `train_300K.xyz` (seeded split, the same for both models); test on all of `test_MD_300K.xyz`
and `test_MD_600K.xyz` (the 600 K set lies partly outside the 300 K training distribution).

Models, each one `so3krates train` process under `flock /tmp/so3krates-cpu.lock` with the same budget
(`training.max_time`) and threads (2), then `so3krates evaluate` on both test files:

- `so3lr-finetuned`: `benchmarks/configs/acac_so3lr_finetune.yaml` (`training.init_from: so3lr`);
- `scratch`: `benchmarks/configs/acac_scratch.yaml` (our paper preset, the settings of our rMD17 benchmark);
- `so3lr-zero-shot`: no training, `so3krates evaluate --model so3lr` on the test files. Its forces show what
  the published model gives at this different level of theory; its energies are not comparable (no
  per-element shift for this reference), so the table leaves them out.

Results: `benchmarks/results/so3lr/finetune_acac.json` (every command, config, epochs, metrics) and
`finetune_acac.md`. Runs go to `benchmarks/runs/acac/` (gitignored).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from accuracy import ROOT, _git_commit, machine_info, run_logged, write_atomically  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "botnet_acac"
TESTS = {"300K": DATA / "test_MD_300K.xyz", "600K": DATA / "test_MD_600K.xyz"}
CONFIGS = {
    "so3lr-finetuned": BENCH / "configs" / "acac_so3lr_finetune.yaml",
    "scratch": BENCH / "configs" / "acac_scratch.yaml",
}
OUT = BENCH / "results" / "so3lr"
RUNS = BENCH / "runs" / "acac"


def zero_shot() -> dict:
    python = ROOT / ".venv" / "bin" / "python"
    run_dir = RUNS / "so3lr-zero-shot"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    result = {"epochs": 0, "test": {}}
    for label, path in TESTS.items():
        metrics_path = run_dir / f"test_{label}.json"
        evaluate = [str(python), "-m", "so3krates", "evaluate", "--model", "so3lr", "--data", str(path)]
        evaluate += ["--json", str(metrics_path), "--out-dir", str(run_dir / label), "--threads", "2"]
        evaluate += ["--dtype", "float32"]
        run_logged(evaluate, run_dir / f"evaluate_{label}_log.txt", timeout=3600)
        result["test"][label] = {"command": evaluate, **json.loads(metrics_path.read_text())}
    return result


def run_model(name: str, budget: float) -> dict:
    if name == "so3lr-zero-shot":
        return zero_shot()
    python = ROOT / ".venv" / "bin" / "python"
    run_dir = RUNS / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    train_dir = run_dir / "train"
    command = [str(python), "-m", "so3krates", "train", str(CONFIGS[name])]
    command += ["--set", f"run_dir={train_dir}", "--set", f"training.max_time={budget}"]
    command += ["--set", f"data.train_file={DATA / 'train_300K.xyz'}"]
    started = time.perf_counter()
    run_logged(command, run_dir / "train_log.txt", timeout=budget + 1800)
    wall = time.perf_counter() - started
    with open(train_dir / "metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    result = {
        "config_file": str(CONFIGS[name].relative_to(ROOT)),
        "resolved_config": yaml.safe_load((train_dir / "config.yaml").read_text()),
        "train_command": command,
        "train_wall_s": wall,
        "epochs": len(history),
        "history": history,
        "test": {},
    }
    for label, path in TESTS.items():
        metrics_path = run_dir / f"test_{label}.json"
        evaluate = [str(python), "-m", "so3krates", "evaluate", "--model", str(train_dir / "best.pt")]
        evaluate += ["--data", str(path), "--json", str(metrics_path), "--out-dir", str(run_dir / label)]
        evaluate += ["--threads", "2"]
        run_logged(evaluate, run_dir / f"evaluate_{label}_log.txt", timeout=3600)
        result["test"][label] = {"command": evaluate, **json.loads(metrics_path.read_text())}
    return result


def markdown(results: dict) -> str:
    lines = [
        "# SO3LR fine-tuned vs. trained from scratch: acetylacetone",
        "",
        f"{results['date']}, commit {results['commit']}, budget {results['budget_minutes']} min of training "
        "per model (2 threads, one model at a time), 450 train / 50 valid structures of `train_300K.xyz`; "
        "test on all 650 structures of each test file. Energies per structure (meV), forces per component "
        "(meV/Å). Produced by `benchmarks/so3lr_finetune.py`.",
        "",
        "| model | epochs | 300 K E MAE | 300 K F MAE | 600 K E MAE | 600 K F MAE |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        t300, t600 = entry["test"]["300K"], entry["test"]["600K"]
        energies = [f"{t['energy_mae_meV']:.1f}" if entry["epochs"] else "—" for t in (t300, t600)]
        lines.append(
            f"| {name} | {entry['epochs']} | {energies[0]} | {t300['forces_mae_meV_per_A']:.1f} "
            f"| {energies[1]} | {t600['forces_mae_meV_per_A']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=5.0)
    parser.add_argument("--models", default=",".join([*CONFIGS, "so3lr-zero-shot"]))
    args = parser.parse_args(argv)
    for path in [DATA / "train_300K.xyz", *TESTS.values()]:
        if not path.is_file():
            raise SystemExit(f"so3lr_finetune.py: {path} not found (the shared data folder)")
    results_path = OUT / "finetune_acac.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"models": {}}
    results.update(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        commit=_git_commit(),
        machine=machine_info(),
        budget_minutes=args.budget_minutes,
    )
    for name in args.models.split(","):
        print(
            f"{name}: {'evaluating' if name not in CONFIGS else f'training for {args.budget_minutes} min'} …"
        )
        results["models"][name] = run_model(name, 60.0 * args.budget_minutes)
        t = results["models"][name]["test"]
        print(
            f"  {results['models'][name]['epochs']} epochs; test F MAE 300 K "
            f"{t['300K']['forces_mae_meV_per_A']:.1f}, 600 K {t['600K']['forces_mae_meV_per_A']:.1f} meV/Å",
            flush=True,
        )
        OUT.mkdir(parents=True, exist_ok=True)
        write_atomically(results_path, json.dumps(results, indent=2, default=str))
        write_atomically(OUT / "finetune_acac.md", markdown(results))
    print(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
