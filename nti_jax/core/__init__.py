"""The numerical core: settings, DDIM schedules, conditioning pytrees, sampling, memory planning,
inversion (and its file), Prompt-to-Prompt controllers and editing, heat maps, and the sharded
programs every call runs. Imports `loading`, `models` and the leaf utilities; never prints or
reads the command line."""
