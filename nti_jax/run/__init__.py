"""The command line and batch runs: arguments and the run config, manifests, the driver, the shared
run folder (claims, ledger, writer) and process set-up. The top layer: nothing imports it."""
