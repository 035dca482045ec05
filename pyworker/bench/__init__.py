"""``pyworker bench``: the throughput and cost profiler (``profiler``) and the embedded
loopback master it runs against (``embedded_master``), so it needs no setup.

May import anything of pyworker: it drives a real worker from the outside.
"""
