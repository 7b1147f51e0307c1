"""What every part of the project shares: user errors and the command wrapper, paths, atomic
outputs, hardware defaults, the console and warning filters. Imports nothing heavy."""
