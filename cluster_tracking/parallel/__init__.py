"""The parallel runtime: worker processes, the tracker's child process and its CPU throttle."""
