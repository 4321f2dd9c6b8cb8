"""`splitpoint bench`: measured answers to "where should I split my model on my link?".

Link emulation (network namespaces + tbf + a delay line as root, a userspace link proxy
otherwise), emulated edge CPUs calibrated against a device profile, runs of every candidate
over real sockets, and the report.
"""
