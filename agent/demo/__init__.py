"""The bundled demo recording (digits spoken by espeak-ng) and the script that made it."""
