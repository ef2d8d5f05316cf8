"""The command-line tools behind `scripts/` (train, evaluate, demo, compare_policies, train_adore,
inspect_data, plot_metrics, plot_spans): each module's `main(argv)` is what its script runs, so the
tests call the same code a user runs, through the installed package."""
