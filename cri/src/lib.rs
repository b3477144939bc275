//! huskd, the CRI server; arrives with the CRI issue.
