"""Print the markdown tables of docs/RESULTS.md from an eval report with `comparison` and
`independent` sections (see scripts/compare_variants.sh)."""

import json
import sys


def main(path: str) -> None:
    rep = json.load(open(path))
    print("| run | settings | cross R² (mean off-diag.) | self R² | dead fraction | FE median |")
    print("|---|---|---|---|---|---|")
    for row in rep["comparison"]:
        fe = row["firing_entropy_median"]
        settings = (f"preset {row['preset']}, decoder_update={row['decoder_update']}, "
                    f"schedule={row['schedule']}, standardize={row['standardize']}"
                    + (", **shuffled pairing**" if row["shuffle_pairing"] else ""))
        print(f"| {row['run'].rstrip('/').split('/')[-1]} | {settings} "
              f"| {row['cross_r2_mean']:.3f} | {row['self_r2_mean']:.3f} "
              f"| {row['dead_fraction_mean']:.3f} | {'—' if fe is None else f'{fe:.3f}'} |")
    if "independent" in rep:
        print()
        print("| model | matched (cos > 0.5) | mean cosine | random: matched | "
              "random: mean cosine |")
        print("|---|---|---|---|---|")
        for m, r in rep["independent"]["models"].items():
            print(f"| {m} | {r['matched_fraction']:.3f} | {r['mean_cosine']:.3f} "
                  f"| {r['random_matched_fraction']:.3f} | {r['random_mean_cosine']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
