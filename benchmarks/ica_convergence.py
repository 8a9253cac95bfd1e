"""Convergence of the workflow's ICA jobs, from their score files (``results/{model}/ica/*/b*.npz``).

Per ICA directory (backend, k, options): the solver that iterated it, the runs (batch x layer)
that did not pass FastICA's test within ``ica.max_iter``, listed by batch and layer, and the
iterations used (median, maximum).

    python benchmarks/ica_convergence.py results/smol/ica
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ica_root", help="a model's ICA folder, e.g. results/smol/ica")
    args = p.parse_args()
    print(f"{'ICA folder':22} {'solver':8} {'runs':>5} {'non-conv.':>9} {'%':>6} {'median it':>9} {'max it':>6}  where")
    for d in sorted(Path(args.ica_root).iterdir()):
        files = sorted(d.glob("b*.npz"), key=lambda f: int(f.stem[1:]))
        if not files:
            continue
        conv, iters, where, solvers = [], [], [], set()
        for f in files:
            with np.load(f) as z:
                c, it = z["converged"].astype(bool), z["n_iter"]
                solvers.add(str(z["solver"]) if "solver" in z else "fastica (before the solver record)")
            conv += c.tolist()
            iters += it[c].tolist()
            where += [f"{f.stem}/L{layer}" for layer in np.flatnonzero(~c)]
        n_bad = len(where)
        print(
            f"{d.name:22} {'+'.join(sorted(solvers)):8} {len(conv):>5} {n_bad:>9} {100 * n_bad / len(conv):>6.1f} "
            f"{int(np.median(iters)) if iters else '-':>9} {max(iters) if iters else '-':>6}  {' '.join(where) or '-'}"
        )


if __name__ == "__main__":
    main()
