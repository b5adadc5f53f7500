"""Actors: one task per component, mailboxes, worker threads and supervision."""
