"""The Textual operator console; it talks only to the admin API."""
