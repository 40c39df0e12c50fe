"""Runnable examples of ProtoBase under real load; each module's docstring says how to run it."""
