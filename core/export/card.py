"""The README.md model card written beside an export. Its first ```python block is the
loading recipe; verify_export() runs exactly that block in a fresh process."""
from __future__ import annotations

LOAD_NOTES = {
    "quanto": ("Needs `optimum-quanto`, `accelerate`, `safetensors` and `transformers`. "
               "`transformers`' own `from_pretrained` cannot read this folder: quanto's "
               "serialization is loaded with `requantize` as above. quanto's files do not "
               "record the group size and its loader would pick another from each layer's "
               "shape, so `group_sizes.json` holds the one these weights were quantized with "
               "and the snippet sets it before loading them."),
    "hqq": ("Needs `hqq` and `transformers`. Each linear layer's bit-width, group size, "
            "scale and zero are stored with it in `qmodel.pt`."),
    "gptq": ("Needs `gptqmodel` (`pip install gptqmodel`). The per-layer bit-widths are the "
             "`dynamic` entry of `quantization_config` in `config.json`, which GPTQModel and "
             "vLLM read (`vllm serve <this folder>`, or `vllm.LLM(model=...)`; vLLM was not "
             "tested with this export). Plain `transformers` ignores `dynamic` and would load "
             "every layer as 4-bit: use GPTQModel or vLLM. `allocation.json` "
             "(`quantization.allocation_from`) says which quantizer's errors the allocation "
             "was chosen from: `gptq` when these are the GPTQ layers SPQE measured."),
}


def per_layer_table(label: str, values) -> list[str]:
    """A one-row markdown table: the layer numbers as columns, `values` under them."""
    return ["| layer | " + " | ".join(str(i) for i in range(len(values))) + " |",
            "|---|" + "---:|" * len(values),
            f"| {label} | " + " | ".join(str(v) for v in values) + " |"]


# How each allocation model chose the layers' precisions, as the card says it
METHOD_WORDS = {
    "impq": "IMPQ as the paper specifies it: Shapley estimates of how the layers' quantization "
            "errors interact, solved for a memory budget",
    "impq-local": "IMPQ-local, an extension of the paper's method: the layers' interactions "
                  "estimated near the budget, solved for it",
    "impq-fit": "IMPQ-fit, an extension of the paper's method: a quadratic model fitted to the "
                "losses SPQE measured, solved for the memory budget",
    "impq-checked": "IMPQ-fit, checked, an extension of the paper's method: about 30 candidate "
                    "allocations of the memory budget measured on the calibration text, the "
                    "least loss kept",
}


def model_card(exporter, record: dict, path: str) -> str:
    bits = record["bits_per_layer"]
    levels = sorted(set(record["run"].get("levels") or bits))
    top = levels[-1]
    high = sum(b == top for b in bits)
    words = METHOD_WORDS.get(record["method"], record["method"])
    target = (f"{record['target_bits']:.2f} bits per weight" if record["target_bits"] is not None
              else "the allocation's own size")
    ppl = record["ppl"]
    mixed = "/".join(map(str, levels))
    lines = [
        f"# {record['model']}: mixed {mixed}-bit ({record['backend']})",
        "",
        f"{record['model']} with each decoder layer quantized to {' or '.join(map(str, levels))} "
        f"bits by {record['library']}: {high} of {len(bits)} layers at {top} bits. The allocation "
        f"was chosen by impq-tui ({words}) from run `{record['run']['id']}` "
        f"({record['run']['samples']} SPQE sample{'s' if record['run']['samples'] != 1 else ''}). Embeddings, norms and the LM head keep "
        f"{record['dtype']}.",
        "",
        "## Load it",
        "",
        "```python",
        exporter.snippet(path, record["dtype"]).rstrip("\n"),
        "```",
        "",
        LOAD_NOTES[record["backend"]],
        "",
        "## Size",
        "",
        "| | bytes |",
        "|---|---:|",
        f"| quantized decoder-layer weights (codes, scales, zeros) | {record['bytes']:,} |",
        f"| budget at {target} | {record['budget_bytes']:,} |",
        f"| weight files on disk (all tensors) | {record['disk_bytes']:,} |",
        "",
        f"Effective {record['avg_bits']:.3f} bits per quantized weight with metadata, "
        f"{record['weight_bits']:.3f} without.",
        "",
        "## Bits per layer",
        "",
        *per_layer_table("bits", bits),
        "",
    ]
    if ppl is not None:
        lines += ["## Perplexity", "",
                  f"{ppl['value']:.4f} on {ppl['eval_tokens']:,} predicted tokens of "
                  f"`{ppl['eval_text']}` (impq-tui's evaluation text)."
                  + (f" Loaded back from this folder with the snippet above: "
                     f"{record['ppl_reloaded']:.4f}." if record.get("ppl_reloaded") else ""), ""]
    if record["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in record["notes"]] + [""]
    lines += ["## Files", "",
              "- " + ", ".join(f"`{f}`" for f in record["weight_files"]) + ": the weights",
              "- `config.json`, tokenizer files: as for the original model",
              "- `allocation.json`: bits and bytes per layer, budget, method, run id", ""]
    return "\n".join(lines)
