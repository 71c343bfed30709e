"""``moe-reg analyze``: evaluate checkpoints on the same validation tokens and write a report."""
