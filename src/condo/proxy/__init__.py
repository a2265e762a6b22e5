"""condo's built-in proxy (`:proxy`): data planes outside condo's process (the kernel's NAT in
condo's own nftables table, and HAProxy), the routes condo wants them to have, and the task that
keeps them equal.

`condo.routes` (pure) says what should serve each listener, from the services' states; `nat` is
the only code that touches nftables (condo's table, for `:tcp` listeners); `haproxy` is the only
code that talks to the HAProxy process (its files, its start, its admin socket); `reconcile` is
the task that chooses each listener's plane and makes both follow the routes.
"""
