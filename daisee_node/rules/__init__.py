"""Local exchange rules: expressions over channel values that emit relay intents."""
