//! Balancing: how many clients a session server asks to move, decided from counts alone.
//!
//! Every `balance_interval` a session server compares the connection count it last reported to
//! the meta tier with the mean the meta tier computed from everyone's reports (like with like: a
//! count taken now against a mean of older reports would have every server shedding clients while
//! they all still fill up). Above the mean by more than a quarter, and by more than
//! [`BALANCE_SLACK`], it asks half the excess to move; with no other session server there is
//! nowhere to go.

/// Connections above the mean that never trigger rebalancing.
pub const BALANCE_SLACK: u64 = 10;

/// How many clients to ask to move: `reported` is the count this server last reported, `mean`
/// the mean the meta tier answered with it, `here` the count now, `sessions` the session servers
/// in the cluster view. `None`: none.
pub fn clients_to_move(reported: u64, mean: u64, here: u64, sessions: usize) -> Option<u64> {
    if sessions < 2 || mean == 0 {
        return None;
    }
    if reported <= mean + mean / 4 || reported - mean <= BALANCE_SLACK {
        return None;
    }
    let excess = ((reported - mean) / 2).min(here);
    (excess > 0).then_some(excess)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_excess_moves_when_well_above_the_mean() {
        assert_eq!(clients_to_move(200, 100, 200, 3), Some(50));
        assert_eq!(
            clients_to_move(200, 100, 30, 3),
            Some(30),
            "no more than are here"
        );
    }

    #[test]
    fn nothing_moves_near_the_mean_or_with_nowhere_to_go() {
        assert_eq!(clients_to_move(125, 100, 125, 3), None, "within a quarter");
        assert_eq!(clients_to_move(18, 8, 18, 3), None, "within the slack");
        assert_eq!(
            clients_to_move(200, 100, 200, 1),
            None,
            "the only session server"
        );
        assert_eq!(clients_to_move(200, 0, 200, 3), None, "no mean known yet");
        assert_eq!(
            clients_to_move(200, 100, 0, 3),
            None,
            "everyone already left"
        );
    }
}
