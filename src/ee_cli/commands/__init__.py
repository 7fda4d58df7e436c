"""The pipelines the CLI drives, one per command (attach, personalise, evaluate, export, run), each
taking its config and returning values; their help texts (options) and printed tables (render, plots).
May import every stage; nothing imports it but ee_cli.cli."""
