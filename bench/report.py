"""Prints the ratio table of a pytest-benchmark JSON file: per group, every contender's median time
divided by the fastest JAX entry's (so > 1 means JAX is faster), and the extra figures recorded.

    python bench/report.py .benchmarks/latest.json
"""

import json
import sys


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cores")
    print("| stage | contender | median | JAX speed-up over it | notes |")
    print("|---|---|---|---|---|")
    for group, items in groups.items():
        jax_items = [b for b in items if "jax" in b["name"]] or items  # sharding groups: all are JAX
        base = min(b["stats"]["median"] for b in jax_items)
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            median = b["stats"]["median"]
            ratio = f"{median / base:.2f}x"
            extra = ", ".join(f"{k}={v}" for k, v in b.get("extra_info", {}).items())
            print(f"| {group} | {b['name']} | {median * 1e3:.1f} ms | {ratio} | {extra} |")


if __name__ == "__main__":
    main(sys.argv[1])
