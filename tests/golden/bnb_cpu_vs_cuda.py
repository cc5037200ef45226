"""Where bitsandbytes' CPU path disagrees with its CUDA path (the golden fixtures), and with `nf4`.

Runs on CPU: ``python tests/golden/bnb_cpu_vs_cuda.py`` prints a Markdown table per (quant_type, field):
how many fixture cases bnb-CPU and `nf4` each reproduce exactly, over the fixture's inputs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import bitsandbytes.functional as F
import torch
from safetensors.torch import load_file

import nf4

HERE = Path(__file__).parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> None:
    inputs = load_file(HERE / "inputs.safetensors")
    ref = load_file(HERE / "bnb_cuda.safetensors")
    cases = sorted({k.rsplit("/", 1)[0] for k in ref})
    stats: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # bnb-cpu same, nf4 same, n
    examples: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for case in cases:
        name, dt, qt, bs, dq = case.split("/")
        x = inputs[name].to(DTYPES[dt])
        packed, st = F.quantize_4bit(x, blocksize=int(bs), quant_type=qt, compress_statistics=dq == "dq")
        q = nf4.quantize(x, qt, int(bs), dq == "dq")
        fields = {"packed codes": (packed.view(-1), q.data.view(-1), ref[f"{case}/packed"])}
        if dq == "dq":
            ours_off = torch.tensor([q.nested_offset])
            fields["offset"] = (st.offset.reshape(1), ours_off, ref[f"{case}/offset"])
            fields["nested 8-bit codes"] = (st.absmax, q.absmax, ref[f"{case}/absmax"])
        else:
            fields["absmax"] = (st.absmax, q.absmax, ref[f"{case}/absmax"])
        for field, (cpu, ours, cuda) in fields.items():
            key = (qt, dq, field)
            s = stats[key]
            s[0] += torch.equal(cpu, cuda)
            s[1] += torch.equal(ours, cuda)
            s[2] += 1
            if not torch.equal(cpu, cuda):
                examples[key].add(f"{name}/{dt}")
    print("| quant_type | double quant | field | bnb CPU = CUDA | nf4 = CUDA | inputs where bnb CPU differs |")
    print("|---|---|---|---|---|---|")
    for (qt, dq, field), (cpu_same, ours_same, n) in sorted(stats.items()):
        ex = ", ".join(sorted(examples[(qt, dq, field)])[:6]) + (" …" if len(examples[(qt, dq, field)]) > 6 else "")
        print(f"| {qt} | {dq == 'dq'} | {field} | {cpu_same}/{n} | {ours_same}/{n} | {ex} |")


if __name__ == "__main__":
    main()
