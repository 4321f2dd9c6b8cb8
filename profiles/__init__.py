"""What is measured: device and network profiles, their validated loaders, and the profiler."""
