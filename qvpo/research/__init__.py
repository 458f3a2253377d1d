"""Research add-ons around QVPO: the open questions of docs/paper-notes.md#open-questions, each
beside its mechanism.

They attach to the agent through the hook interface of `qvpo.hooks` (nothing here is imported by
the agent itself), and each module that answers an open question keeps the report section that
reads its metrics next to it.
"""
