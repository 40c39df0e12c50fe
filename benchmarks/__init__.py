"""ProtoBase benchmarks: `python -m benchmarks core` (see docs/performance.md).

Benchmarks report medians of repeats and ratios against references measured
in the same run, because the machines they run on are shared and noisy: an
absolute number from one run says little, a ratio measured side by side says
more. They never assert timings; they print a markdown table and record it in
docs/performance.md.
"""
