"""Where does IMPQ's advantage go? Every allocation of a saved comparison, measured four ways.

SPQE optimizes the loss on calibration tokens with simulated weights (de-quantized
weights swapped into the original linears); the comparison reports perplexity on other
tokens with the real backend's modules. This script measures each allocation of
RUN/compare/<backend>.json on both token sets, both ways, so a lost advantage can be
put on one of the two steps: simulated -> real modules, or calibration -> evaluation text.

    python bench/quality_diagnosis.py RUN [--backend B] [--out FILE.json]

Prints, per budget and method, the mean NLL (nats/token) of the four measurements and
which method is best under each; writes the same as JSON. Needs the run's model (the
embedded one on a GPU box: see DEVELOPERS notes in the README's quality section).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.compare import LABELS, _load, calibration_windows, load_saved, tokens_sha256  # noqa: E402
from core.data import eval_tokens  # noqa: E402
from core.runs import RunDir  # noqa: E402
from core.switching import LayerSwitch, PrefixEvaluator  # noqa: E402

MEASURES = ("calib_sim", "calib_real", "eval_sim", "eval_real")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory with compare/<backend>.json")
    p.add_argument("--backend", help="which saved comparison (default: the run's backend)")
    p.add_argument("--out", help="JSON file to write (default RUN/compare/<backend>-diagnosis.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = RunDir.open(args.run)
    backend = args.backend or run.config.backend
    saved = load_saved(run, backend)
    if saved is None:
        print(f"{run.path}/compare/{backend}.json does not exist: run `impq-tui compare` first.")
        return 2
    t0 = time.perf_counter()
    log = lambda message, level="info": print(message, flush=True)  # noqa: E731
    loaded, backend_impl, settings = _load(run, None, backend, saved.eval["text"],
                                           saved.eval["windows"], saved.eval["window_tokens"], log)
    micro = max(1, run.config.micro_batch)
    calib = calibration_windows(loaded, run.config)
    tokens = eval_tokens(loaded.tokenizer, settings, run.config.calib_text, log)
    if tokens_sha256(tokens) != saved.eval["tokens_sha256"]:
        print("the evaluation tokens differ from the saved comparison's: stopping.")
        return 2
    # Two switches over the same linears: each puts the originals back after use.
    real = LayerSwitch(loaded, backend_impl, real=True, keep_original=True)
    real.restore_original()
    switch = LayerSwitch(loaded, backend_impl, keep_original=True)
    switch.restore_original()
    evaluators = {"calib": PrefixEvaluator(loaded, calib, micro),
                  "eval": PrefixEvaluator(loaded, tokens, micro)}

    def measure(bits) -> dict:
        out = {}
        switch.apply(bits)                      # simulated: de-quantized weights
        for name, ev in evaluators.items():
            out[f"{name}_sim"] = ev.evaluate(0)
        switch.restore_original()
        real.apply(bits)                        # the real quantized modules
        for name, ev in evaluators.items():
            out[f"{name}_real"] = ev.evaluate(0)
        real.restore_original()
        return out

    rows, cache = [], {}
    for r in saved.results:
        key = tuple(r.bits_per_layer)
        if key not in cache:
            cache[key] = measure(list(key))
        m = cache[key]
        rows.append({"method": r.method, "target_bits": r.target_bits,
                     "layers_high": r.layers_high, **m, "saved_eval_real": r.nll})
        print(f"{LABELS.get(r.method, r.method):>12} {r.target_bits:g}: " +
              "  ".join(f"{k} {m[k]:.4f}" for k in MEASURES) + f"  (saved {r.nll:.4f})", flush=True)
    best = {}
    for b in saved.bits:
        at = [x for x in rows if x["target_bits"] == b]
        best[str(b)] = {k: min(at, key=lambda x: x[k])["method"] for k in MEASURES}
        impq = next(x for x in at if x["method"] == "impq")
        base = [x for x in at if x["method"] not in ("impq", "impq-local")]
        ratios = {k: math.exp(impq[k] - min(x[k] for x in base)) for k in MEASURES}
        best[str(b)]["impq_over_best_baseline_ppl"] = ratios
        print(f"{b:g} bits: best by " + ", ".join(f"{k} {best[str(b)][k]}" for k in MEASURES)
              + "; IMPQ / best baseline ppl " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    dev = loaded.device
    report = {"run": str(run.path), "backend": backend, "device": str(dev),
              "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
              "calib_tokens": int(calib.numel()), "eval_tokens": int(tokens.numel()),
              "v_high_run": run.samples()[0]["v_high"], "rows": rows, "best": best,
              "seconds": time.perf_counter() - t0}
    out = Path(args.out) if args.out else run.path / "compare" / f"{backend}-diagnosis.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
