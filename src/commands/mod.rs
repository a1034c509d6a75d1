pub mod compose;
pub mod import;
pub mod inspect;
pub mod model;
pub mod verify;
