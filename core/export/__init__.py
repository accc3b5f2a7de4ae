"""Export: a run's allocation written as a quantized model that ordinary tools load.

    export_model(run, bits_per_layer, backend, out_dir) -> ExportResult

One module per library (quanto, hqq, gptq) quantizes the model with each decoder
layer at its own bit-width and saves it in that library's own format. This module
does what they share: it checks the input, writes into a hidden sibling folder and
renames it into place only when everything is written (an interrupted export leaves
no folder that looks complete), measures the quantized weights in the written files
against the budget, and puts the tokenizer, allocation.json and a README model card
beside the weights. verify_export() loads a finished export back in a fresh Python
process with the README's own snippet (the library's public loader, none of our code)
and measures perplexity on the same tokens.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from core import events
from core.control import pid_alive
from core.data import eval_tokens
from core.errors import InvalidField, UserError
from core.export.base import Exporter, Written, check_layers, layer_bytes, writing
from core.export.card import model_card
from core.fingerprint import unchecked
from core.models import LoadedModel, pick_device
from core.runs import RunDir, write_atomic
from core.solver import budget_bytes
from core.spqe import Cancelled
from core.switching import perplexity

ALLOCATION, README = "allocation.json", "README.md"
PARTIAL, PID = ".partial-", ".pid"
FORMAT = 1

# Relative perplexity difference allowed between the in-memory quantized model and the
# export loaded back in a fresh process (verify). float32 runs the same modules on the
# same tokens, only the order of summation differs: seen 0 to 1e-7. In 16 bits a
# loader may pick another kernel than the one in memory (GPTQModel does) and each
# logit keeps 8 (bfloat16) or 11 (float16) mantissa bits: seen up to 5e-5 in bfloat16.
ROUND_TRIP_RTOL = {"float32": 1e-5, "bfloat16": 1e-3, "float16": 1e-3}


def _gptq_installed() -> bool:
    return importlib.util.find_spec("gptqmodel") is not None


def _llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# GPTQ and GGUF (llama-cpp-python) are optional extras; whether they import is checked
# when they are used (importing takes seconds), so that a broken install gives a clear
# message, not a traceback.
EXPORT_BACKENDS: tuple[str, ...] = (("quanto", "hqq") + (("gptq",) if _gptq_installed() else ())
                                    + (("gguf",) if _llama_cpp_installed() else ()))
ALL_BACKENDS = ("quanto", "hqq", "gptq", "gguf")


@dataclass(frozen=True)
class ExportResult:
    out_dir: str
    backend: str
    bits_per_layer: tuple[int, ...]
    target_bits: float | None     # the b asked for; None when bits_per_layer came without one
    avg_bits: float               # 8 bytes / quantized weights: metadata included
    bytes: int                    # quantized weights as stored in the written files
    budget_bytes: int             # the run's budget at target_bits (or the allocation's own bytes)
    disk_bytes: int               # size of the weight files (embeddings, norms, head included)
    ppl: float | None             # in-memory quantized model, when evaluated
    seconds: float
    weight_bits: float = 0.0      # sum(bits x weights) / weights: metadata excluded
    ppl_reloaded: float | None = None   # the export loaded back in a fresh process (verify)
    eval_tokens: int = 0          # tokens predicted for ppl
    notes: tuple[str, ...] = ()   # what a user should know about this export

    def to_json(self) -> dict:
        d = asdict(self)
        d["bits_per_layer"] = list(self.bits_per_layer)
        d["notes"] = list(self.notes)
        return d


def get_exporter(name: str) -> Exporter:
    if name == "quanto":
        from core.export.quanto import QuantoExporter

        return QuantoExporter()
    if name == "hqq":
        from core.export.hqq import HqqExporter

        return HqqExporter()
    if name == "gptq":
        from core.export.gptq import GptqExporter

        return GptqExporter()
    if name == "gguf":
        from core.export.gguf import GgufExporter

        return GgufExporter()
    raise UserError(f"unknown export backend {name!r}; choose one of: {', '.join(ALL_BACKENDS)}.")


def export_model(run: RunDir, bits_per_layer: list[int], backend: str, out_dir: str, *,
                 force: bool = False, target_bits: float | None = None, method: str = "impq",
                 evaluate: bool = False, verify: bool = False, eval_text: str | None = None,
                 eval_windows: int | None = None, eval_window_tokens: int | None = None,
                 device: str | None = None, callback: events.Callback = events.ignore,
                 cancel: threading.Event | None = None) -> ExportResult:
    """Quantize the run's model with `bits_per_layer` (2 or 4 per decoder layer) through
    `backend` and write it to `out_dir`, with tokenizer, allocation.json and README.md.

    The model written is the one `evaluate_allocation` measures: same loader, quantizer,
    dtype (core.settings) and evaluation tokens. `evaluate` measures its perplexity;
    `verify` also loads the written export back in a fresh process with the README's
    snippet, measures it on the same tokens and publishes nothing if the two differ by
    more than ROUND_TRIP_RTOL. `cancel` stops the export between its steps
    (core.spqe.Cancelled); nothing is left behind then, nor on any error."""
    start = time.perf_counter()
    exporter = get_exporter(backend)
    config, costs = run.config, run.costs()
    bits = _check_bits(bits_per_layer, costs)
    budget = (budget_bytes(costs, target_bits) if target_bits is not None
              else costs.bytes_of(bits))
    out = Path(out_dir).expanduser().absolute()
    check_target(out, run.path.absolute(), force)
    exporter.check_available()
    dev = pick_device(device or config.device)
    settings = exporter.eval_settings(config, dev, text=eval_text, windows=eval_windows,
                                      window_tokens=eval_window_tokens)

    phase = events.Phases(callback, 4 + (evaluate or verify) + verify, cancel)
    checkpoint = phase.log

    with writing(out.parent, out):
        tmp = _partial_folder(out)
    try:
        phase("loading the model", f"loading {config.model_name or config.model} on {dev} "
              f"({settings.dtype}) for the {backend} export")
        if (note := unchecked(config)) is not None:
            callback(events.Log(note, "warning"))
        loaded = exporter.load(config, dev, settings.torch_dtype)
        check_layers(loaded, costs.L, config.model)
        module_bits = {name: b for names, b in zip(loaded.linear_names, bits) for name in names}
        phase(f"quantizing ({backend})", f"quantizing {len(module_bits)} linear modules "
              f"({bits.count(costs.levels[-1])} of {len(bits)} layers at {costs.levels[-1]} bits)")
        loaded = exporter.quantize(loaded, bits, config, checkpoint,
                                   on_layer=lambda i, L: events.check_cancel(cancel))
        phase("writing the files", f"writing the {backend} export")
        with writing(tmp, out):
            written = exporter.write(loaded, module_bits, tmp, config, checkpoint, phase.substep)
            loaded.tokenizer.save_pretrained(tmp)
        _check_budget(written, budget, target_bits, exporter, config)
        ppl = tokens = None
        if evaluate or verify:
            phase("perplexity", f"perplexity of the quantized model on {settings.text}")
            tokens = eval_tokens(loaded.tokenizer, settings, config.calib_text,
                                 lambda message, level="info": callback(events.Log(message, level)))
            with events.cancel_between_layers(loaded.layers, cancel):
                ppl = perplexity(loaded, tokens, max(1, config.micro_batch))
        result = _result(out, backend, bits, target_bits, budget, costs, written, tmp, ppl, tokens)
        record = _allocation_record(run, result, loaded, written, costs, method, settings)
        with writing(tmp, out):
            _write_card(tmp, exporter, record, out)
        del loaded
        exporter.close()   # free the model before a second copy loads in the fresh process
        if verify:
            phase("verifying", "loading the export back in a fresh process (README snippet)")
            reloaded = _verify(tmp, exporter, tokens, ppl, written.dtype, backend, config, cancel)
            result = replace(result, ppl_reloaded=reloaded)
            record["ppl_reloaded"] = reloaded
            with writing(tmp, out):
                _write_card(tmp, exporter, record, out)
        phase("publishing", f"moving the finished export into {out}")
        with writing(tmp, out):
            _publish(tmp, out, force)
        phase.done()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        exporter.close()
    result = replace(result, seconds=time.perf_counter() - start)
    _record_in_run(run, result, callback)
    callback(events.Log(f"exported to {out}: {result.bytes:,} bytes of quantized weights "
                        f"(budget {result.budget_bytes:,}), {result.disk_bytes:,} bytes on disk"))
    return result


def _check_budget(written: Written, budget: int, target_bits, exporter: Exporter, config) -> None:
    stored = sum(written.module_bytes.values())
    if stored > budget:
        raise UserError(
            f"the {exporter.name} export stores {stored:,} bytes of quantized weights, over the "
            f"budget of {budget:,} bytes ({_budget_words(target_bits)}) by {stored - budget:,}. "
            f"{exporter.over_budget_hint(config)}")


def _result(out: Path, backend: str, bits: list[int], target_bits, budget: int, costs,
            written: Written, folder: Path, ppl, tokens) -> ExportResult:
    stored = sum(written.module_bytes.values())
    n_params = sum(costs.params)
    return ExportResult(
        out_dir=str(out), backend=backend, bits_per_layer=tuple(bits), target_bits=target_bits,
        avg_bits=8 * stored / n_params, bytes=stored, budget_bytes=budget,
        disk_bytes=sum((folder / f).stat().st_size for f in written.weight_files),
        ppl=ppl, seconds=0.0,
        weight_bits=sum(b * p for b, p in zip(bits, costs.params)) / n_params,
        eval_tokens=0 if tokens is None else tokens.shape[0] * (tokens.shape[1] - 1),
        notes=tuple(written.notes))


def _write_card(folder: Path, exporter: Exporter, record: dict, out: Path) -> None:
    write_atomic(folder / ALLOCATION, json.dumps(record, indent=1) + "\n")
    own = getattr(exporter, "model_card", None)     # gguf: llama.cpp and Ollama usage
    write_atomic(folder / README, own(record, str(out)) if own else model_card(exporter, record, str(out)))


def _verify(folder: Path, exporter: Exporter, tokens, ppl: float, dtype: str, backend: str,
            config, cancel: threading.Event | None) -> float:
    if hasattr(exporter, "verify"):     # gguf: run by llama.cpp itself, with its own tolerance
        return exporter.verify(folder, tokens, ppl, config, cancel)
    # The card's snippet with the folder's present (temporary) path: the same code, the
    # path being a literal.
    snippet = exporter.snippet(str(folder), dtype)
    reloaded = verify_export(folder, tokens, max(1, config.micro_batch), snippet=snippet,
                             cancel=cancel)
    tolerance = ROUND_TRIP_RTOL[dtype]
    if rel_diff(reloaded, ppl) > tolerance:
        # The files do not give back the model that was quantized: a library bug, not
        # something the user can fix. Publish nothing.
        raise RuntimeError(
            f"the {backend} export loaded back in a fresh process gives perplexity {reloaded:.6g}, "
            f"the in-memory quantized model {ppl:.6g} (relative difference "
            f"{rel_diff(reloaded, ppl):.2g}, tolerance {tolerance:g}); the export was not written.")
    return reloaded


def _budget_words(target_bits: float | None) -> str:
    return (f"the run's target of {target_bits} bits" if target_bits is not None
            else "the allocation's own size in the run's accounting")


def _check_bits(bits_per_layer, costs) -> list[int]:
    bits = [int(b) for b in bits_per_layer]
    if len(bits) != costs.L:
        raise UserError(f"the allocation has {len(bits)} layers, the run's model {costs.L}.")
    if not set(bits) <= set(costs.levels):
        raise UserError(f"bit-widths must be one of the run's levels "
                        f"({', '.join(map(str, costs.levels))}) per layer, got "
                        f"{sorted(set(bits) - set(costs.levels))}.")
    return bits


def check_target(out: Path, run_path: Path, force: bool) -> None:
    """Refuse an output folder the export cannot or must not write (the app asks before it
    measures IMPQ-fit, checked, which takes minutes on a large model)."""
    resolved = out.resolve()
    protected = {Path.home().resolve(), Path(resolved.anchor)}
    cwd = Path.cwd().resolve()
    if resolved in protected or resolved == cwd or resolved in cwd.parents:
        # --force replaces the folder: never the working directory, a folder above it,
        # the home folder or the file-system root (the app passes paths as typed too).
        raise UserError(f"{out} is the current folder, a folder above it, the home folder or the "
                        "root; export into a new folder below it.")
    if out == run_path or out in run_path.parents:
        # With --force this would replace the run directory, or a folder holding it.
        raise UserError(f"{out} is or holds the run directory {run_path}; export into another folder.")
    if out.exists() and not out.is_dir():
        raise InvalidField("out", f"{out} exists and is not a folder; choose another.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already exists and is not empty. Choose another `out`, or ask "
                        "to replace it (`force`).")
    if not out.parent.is_dir():
        raise UserError(f"the folder {out.parent} that should hold the export does not exist; "
                        "create it first.")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write into {out.parent} (permission denied); choose another `out`.")


def _partial_folder(out: Path) -> Path:
    """A hidden sibling of out to write into, marked with our pid while we write it."""
    _remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{PARTIAL}"))
    (tmp / PID).write_text(str(os.getpid()))
    return tmp


def _remove_stale_partials(out: Path) -> None:
    """Remove half-written exports to `out`, and old copies an interrupted --force left
    (.OUT.old-PID), whose writing process is gone (killed)."""
    for old in out.parent.glob(f".{out.name}.old-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove(old)
    for partial in out.parent.glob(f".{out.name}{PARTIAL}*"):
        try:
            pid = int((partial / PID).read_text())
            os.kill(pid, 0)
            continue                      # still being written by a live process
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            pass                          # no or unreadable pid file: writer gone before it wrote one
        shutil.rmtree(partial, ignore_errors=True)


def _shareable(folder: Path) -> None:
    """The permissions a plain `cp -r` would give (mkdtemp and mkstemp make them private)."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    # Read, not set-and-restore: os.umask() would change it for the app's other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; an old one is moved aside first and
    deleted only after, so a crash in between leaves the old or the new, never a mix."""
    (tmp / PID).unlink()
    _shareable(tmp)
    old = None
    if out.exists():
        if any(out.iterdir()) and not force:   # appeared while we were writing
            raise UserError(f"{out} was created by someone else during the export; it is left as "
                            "it is. Choose another `out`, or ask to replace it (`force`).")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """The old `out` that --force replaced. A link given as `out` is removed itself, never
    what it points to (rmtree refuses links: `.OUT.old-PID` stayed for good)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _allocation_record(run: RunDir, result: ExportResult, loaded: LoadedModel, written: Written,
                       costs, method: str, settings) -> dict:
    config = run.config
    per_layer = layer_bytes(loaded.linear_names, written.module_bytes)
    q = costs.drops_of(result.bits_per_layer)
    return {
        "format": FORMAT,
        "tool": f"impq-tui {_version('impq-tui')}",
        "method": method,
        "backend": result.backend,
        "library": written.library,
        "model": config.model_name or config.model,
        "model_source": loaded.source,
        "dtype": written.dtype,
        "run": {"id": f"{run.path.name}@{config.identity_hash()}", "path": str(run.path.absolute()),
                "config_hash": config.identity_hash(), "samples": len(run.samples()),
                "backend": config.backend, "group_size": config.group_size,
                "calib_text": config.calib_text, "levels": list(config.levels)},
        "target_bits": result.target_bits,
        "avg_bits": result.avg_bits,
        "weight_bits": result.weight_bits,
        "bytes": result.bytes,
        "budget_bytes": result.budget_bytes,
        "run_bytes": costs.bytes_used(q),
        "disk_bytes": result.disk_bytes,
        "weight_files": written.weight_files,
        "bits_per_layer": list(result.bits_per_layer),
        "layers": [{"index": i, "bits": b, "bytes": n, "weights": p, "modules": names}
                   for i, (b, n, p, names) in enumerate(zip(result.bits_per_layer, per_layer,
                                                           costs.params, loaded.linear_names))],
        "quantization": written.details,
        "ppl": None if result.ppl is None else {
            "value": result.ppl, "eval_text": settings.text, "eval_tokens": result.eval_tokens,
            "windows": settings.windows, "window_tokens": settings.window_tokens,
            "dtype": settings.dtype, "model": "the in-memory quantized model that was written"},
        "notes": list(result.notes),
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(source checkout)"


def _record_in_run(run: RunDir, result: ExportResult, callback) -> None:
    """Note the export in the run directory's exports/ (a convenience: never fatal, since
    the export is published by now; a read-only run only loses the note)."""
    name = Path(result.out_dir).name
    try:
        run.write_json(f"exports/{name}.json", result.to_json())
    except (OSError, UserError) as exc:
        callback(events.Log(f"the export is complete, but its note in {run.path} could not be "
                            f"written: {exc}", level="warning"))


# ------------------------------------------------------------------ the round trip

def verify_export(folder: str | os.PathLike, tokens: torch.Tensor, micro_batch: int = 8, *,
                  snippet: str | None = None, timeout: float = 3600,
                  cancel: threading.Event | None = None, ppl_script: str | None = None) -> float:
    """Perplexity of an export loaded in a fresh Python process (none of our code on its
    path) by the README's snippet, or by `snippet` (the same code for another path), run
    from an unrelated working directory. `cancel` kills that process (within 0.1 s) and
    raises core.spqe.Cancelled; its temporary folder goes either way."""
    import subprocess
    import sys

    folder = Path(folder).absolute()
    snippet = snippet if snippet is not None else snippet_of(folder / README)
    with tempfile.TemporaryDirectory(prefix="impq-verify-") as work:
        work = Path(work)
        torch.save(tokens.cpu(), work / "tokens.pt")
        script = snippet + "\n\n" + (ppl_script if ppl_script is not None
                                       else _PPL_SCRIPT.format(micro_batch=micro_batch))
        (work / "roundtrip.py").write_text(script)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)       # the loader must not reach our own code
        with open(work / "stderr.txt", "w+") as err:
            proc = subprocess.Popen([sys.executable, "roundtrip.py"], cwd=work, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            deadline = time.monotonic() + timeout
            try:
                while proc.poll() is None:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"loading the export back took over {timeout:.0f} s")
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:   # its whole session: the loader may have started workers
                    os.killpg(proc.pid, 9)
                    proc.wait()
            err.seek(0)
            stderr = err.read()
        if proc.returncode != 0 or not (work / "ppl.json").exists():
            raise RuntimeError(f"loading the export back failed (exit {proc.returncode}):\n"
                               f"{stderr[-4000:]}")
        return float(json.loads((work / "ppl.json").read_text())["ppl"])


def snippet_of(readme: Path) -> str:
    """The first ```python block of a model card."""
    text = readme.read_text()
    begin = text.index("```python\n") + len("```python\n")
    return text[begin:text.index("```", begin)]


_PPL_SCRIPT = '''\
# --- perplexity on saved token windows, with the model the snippet above loaded
import json, math
import torch
import torch.nn.functional as F

tokens = torch.load("tokens.pt")
total, count = 0.0, 0
with torch.no_grad():
    for batch in tokens.split({micro_batch}):
        batch = batch.to(next(model.parameters()).device)
        logits = model(input_ids=batch).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                 reduction="sum").double().item()
        count += batch[:, 1:].numel()
with open("ppl.json", "w") as f:
    json.dump({{"ppl": math.exp(total / count)}}, f)
'''


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else math.inf
