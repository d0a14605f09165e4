"""The parts a stock Linux PV kernel needs from hvlab: its image, notes, start-of-day, devices."""
