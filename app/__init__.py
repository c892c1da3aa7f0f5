"""The application layer: the `retrv` command line, its subcommands and the demo. It sits above the runtime and may
import everything (export, calibration, train); nothing below imports it."""
