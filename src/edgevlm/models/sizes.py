"""Sizes a config may ask for, checked before anything is built: a crafted config.json (a
hidden_size of 10⁹, 10⁶ layers) otherwise starts allocating terabytes or builds for minutes.

Each dimension has a bound well above every released model's (Llama 3.1 405B: hidden 16,384,
intermediate 53,248, 126 layers, 128 heads; Gemma 3: a 262,144-token vocabulary), and the
parameters the config describes must fit this machine's memory in 16-bit, the smallest dtype
edgevlm loads weights in."""

from __future__ import annotations

from edgevlm.errors import UserError
from edgevlm.runtime.limits import machine_memory

LIMITS = {"hidden_size": 1 << 16, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
          "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
          "head_dim": 4096, "vocab_size": 1 << 22, "num_experts": 1024, "image_size": 8192,
          "patch_size": 8192, "max_position_embeddings": 1 << 24}
BYTES_PER_PARAMETER = 2  # bfloat16 / float16


def _dims(sub: dict, name: str, where: str) -> dict[str, int]:
    """The sub-config's dimensions, each a positive integer within its bound."""
    dims = {}
    for key, limit in LIMITS.items():
        value = sub.get(key)
        if value is None:
            continue
        field = f"{name}.{key}" if name else key
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: {field} is {value!r}; it must be a positive integer")
        if value > limit:
            raise UserError(f"{where}: {field} {value:,} is over {limit:,}, larger than any "
                            "released model's; check the config")
        dims[key] = value
    return dims


def _parameters(d: dict[str, int], vision: bool) -> int:
    """About how many parameters a transformer of these dimensions holds."""
    h = d.get("hidden_size", 0)
    ffn = d.get("intermediate_size", 4 * h)
    experts = d.get("num_experts", 0)
    if experts:
        ffn = max(ffn, experts * d.get("moe_intermediate_size", ffn))
    per_layer = 4 * h * h + (2 if vision else 3) * h * ffn
    embeddings = (0 if vision else 2) * d.get("vocab_size", 0) * h
    return d.get("num_hidden_layers", 0) * per_layer + embeddings


def check_sizes(cfg: dict, where: str) -> None:
    """Refuse a config whose dimensions are out of bounds or whose model would not fit this
    machine's memory, in one line naming the fields, before transformers builds anything."""
    subs = [(n, cfg[n]) for n in ("text_config", "vision_config") if isinstance(cfg.get(n), dict)]
    if not subs:
        subs = [("", cfg)]
    total, named = 0, []
    for name, sub in subs:
        dims = _dims(sub, name, where)
        total += _parameters(dims, vision=name == "vision_config")
        named += [f"{name + '.' if name else ''}{k} {dims[k]:,}"
                  for k in ("num_hidden_layers", "hidden_size", "intermediate_size") if k in dims]
    ram = machine_memory()
    if ram and total * BYTES_PER_PARAMETER > ram:
        raise UserError(f"{where}: it describes a model of about {total / 1e9:,.1f}B "
                        f"parameters, {total * BYTES_PER_PARAMETER / 2**30:,.0f} GiB even in "
                        f"16-bit, more than this machine's {ram / 2**30:,.0f} GiB of memory "
                        f"({', '.join(named)}); check those sizes")
