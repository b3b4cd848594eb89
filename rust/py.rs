//! PyO3 glue: argument conversion, calls into the domain modules, error mapping.

pub mod token;

#[cfg(test)]
mod tests {
    #[test]
    fn links() {
        assert_eq!(1 + 1, 2);
    }
}
