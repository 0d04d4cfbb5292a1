"""Dataset readers and the ``data`` stage that turns a public dataset into a dataset artifact."""
