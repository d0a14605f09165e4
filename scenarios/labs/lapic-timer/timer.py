"""Lab lapic-timer: when the LAPIC timer fires (read README.md first).

hvlab calls `timer_expiries(elapsed, first_due, period, periodic)` whenever
it looks at a running LAPIC timer and finds an expiry due. All values are in
timer ticks, counted from the moment the timer was (re)armed:

    elapsed    ticks since then (elapsed >= first_due: at least one is due)
    first_due  when the next expiry was due
    period     the initial count the guest wrote (ticks per period)
    periodic   True in periodic mode (LVT timer bit 17), False in one-shot

Return (expiries, running): how many expiries happened by now, and whether the
timer keeps counting afterwards. hvlab accepts the timer's vector once per
look (expiries beyond the first coalesce in IRR, as on hardware) and adds
`expiries` periods to the next due time if the timer runs on.
"""


def timer_expiries(elapsed, first_due, period, periodic):
    # TODO: periodic mode. As written every timer behaves as a one-shot.
    return 1, False
