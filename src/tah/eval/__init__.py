"""Evaluation of TaH models: answers by generation, teacher-forced next-token accuracy under
iteration policies (the oracle), latent overthinking, threshold sweeps, and reports.

The names below load on first use (`tah._lazy`), so a `tah.eval.cli` that registers a subcommand
never pulls torch into `tah --help`."""

from typing import TYPE_CHECKING

from tah._lazy import lazy_exports

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from tah.eval.answers import answer_accuracy
    from tah.eval.batches import iterate_batches
    from tah.eval.report import depth_table, plot_sweep, results_table, write_results
    from tah.eval.samples import samples_html
    from tah.eval.sweep import threshold_sweep
    from tah.eval.tokens import POLICIES, depth_analysis, next_token_accuracy, overthinking, solution_records

__all__ = ["POLICIES", "answer_accuracy", "depth_analysis", "depth_table", "iterate_batches", "next_token_accuracy",
           "overthinking", "plot_sweep", "results_table", "samples_html", "solution_records", "threshold_sweep",
           "write_results"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "answer_accuracy": "tah.eval.answers", "iterate_batches": "tah.eval.batches",
    **dict.fromkeys(["depth_table", "plot_sweep", "results_table", "write_results"], "tah.eval.report"),
    "samples_html": "tah.eval.samples", "threshold_sweep": "tah.eval.sweep",
    **dict.fromkeys(["POLICIES", "depth_analysis", "next_token_accuracy", "overthinking", "solution_records"],
                    "tah.eval.tokens")})
