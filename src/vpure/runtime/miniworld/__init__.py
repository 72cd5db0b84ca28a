"""The mini-world: a seeded synthetic video dataset on real photographs, the small models this
package trains on it, and the shipped weights that make ``vpure demo`` work out of the box."""
