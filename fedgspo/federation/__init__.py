"""Federated training across sites: ranks grouped into sites that trust each other, a plain
all-reduce inside a site, the robust all-reduce between sites, local steps with robust
pseudo-gradients (DiLoCo's outer loop) and compression of the cross-site exchange."""
