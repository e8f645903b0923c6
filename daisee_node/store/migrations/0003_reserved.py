"""Nothing: number 3 is kept so that a version number means the same schema in every file.

In files written up to version 3, migration 3 created tables that the component using them now
creates with its own numbered migrations (registered with `Store.register_migrations`); those
recognise the tables already there and keep them with their rows.
"""

SQL = ""
