"""Accounts: the Labs flag, connecting a mailbox (directly or through a browser
sign-in), update-email and disconnect. :mod:`.connections` holds the commands,
:mod:`.consent` the sign-ins that a browser redirect finishes."""
