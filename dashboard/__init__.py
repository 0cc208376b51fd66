"""Static, self-contained HTML dashboards over result files (eval scores, metrics, preference data).

Reads files only; never imports training code (torch, deepspeed, the alignment package).
"""
